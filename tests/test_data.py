import copy
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ranke.data import (
    ImageCaptionSource,
    decode_image,
    expand_braces,
    read_coco_captions,
    read_eval_prompts,
    resolve_shards,
)
from ranke.runtime import UserError

COLOURS = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "white": (255, 255, 255),
    "grey": (128, 128, 128),
}


def encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def solid(colour: str, width: int = 12, height: int = 8) -> np.ndarray:
    return np.broadcast_to(np.array(COLOURS[colour], dtype=np.uint8), (height, width, 3)).copy()


def expected_image(colour: str, size: int) -> torch.Tensor:
    return torch.tensor(COLOURS[colour], dtype=torch.float32).div(255).view(3, 1, 1).expand(3, size, size)


def seen_pairs(source: ImageCaptionSource, n_batches: int, batch_size: int):
    pairs = []
    for _ in range(n_batches):
        captions, images = source.next_batch(batch_size)
        assert images.shape == (batch_size, 3, source.image_size, source.image_size)
        pairs.extend(zip(captions, images))
    return pairs


def colour_folder(folder, colours, listing="jsonl"):
    """One solid image per colour, captioned 'a <colour> image' (sizes vary, non-square)."""
    folder.mkdir()
    entries = []
    for number, colour in enumerate(colours):
        name = f"{number:05d}.png"
        (folder / name).write_bytes(encode(solid(colour, width=10 + 2 * number, height=6 + number)))
        entries.append({"file": name, "caption": f"a {colour} image"})
    if listing == "jsonl":
        (folder / "captions.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    else:
        lines = ["file,caption"] + [f"{e['file']},\"{e['caption']}, plain\"" for e in entries]
        (folder / "captions.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_folder_jsonl_pairs_images_with_captions_and_skips_bad_entries(tmp_path):
    folder = colour_folder(tmp_path / "samples", ["red", "green", "blue"])
    (folder / "corrupt.png").write_bytes(b"\x89PNG not really an image")
    (folder / "blank.png").write_bytes(encode(solid("white")))
    with open(folder / "captions.jsonl", "a") as listing:
        listing.write(json.dumps({"file": "corrupt.png", "caption": "a broken image"}) + "\n")
        listing.write(json.dumps({"file": "missing.png", "caption": "an image that is not there"}) + "\n")
        listing.write(json.dumps({"file": "blank.png", "caption": "   "}) + "\n")
    with pytest.warns(UserWarning, match="1 no caption, 1 no image"):
        source = ImageCaptionSource(str(folder), image_size=4, rng=np.random.default_rng(0))
    assert len(source) == 4 and source.stats["no_image"] == 1 and source.stats["no_caption"] == 1

    with pytest.warns(UserWarning, match="corrupt.png"):
        pairs = seen_pairs(source, n_batches=3, batch_size=2)  # 6 readable images: two epochs
    assert source.stats["unreadable_images"] == 1  # found in epoch 1, not tried again in epoch 2
    captions = [caption for caption, _ in pairs]
    assert sorted(captions[:3]) == sorted(captions[3:]) == ["a blue image", "a green image", "a red image"]
    for caption, image in pairs:
        assert torch.equal(image, expected_image(caption.split()[1], 4))


def test_folder_csv_and_listing_path(tmp_path):
    folder = colour_folder(tmp_path / "samples", ["grey", "blue"], listing="csv")
    for source_path in (folder, folder / "captions.csv"):
        source = ImageCaptionSource(str(source_path), image_size=3, rng=np.random.default_rng(1))
        pairs = seen_pairs(source, n_batches=1, batch_size=2)
        assert sorted(caption for caption, _ in pairs) == ["a blue image, plain", "a grey image, plain"]
        for caption, image in pairs:
            assert torch.equal(image, expected_image(caption.split()[1].rstrip(","), 3))
    (folder / "captions.csv").write_text("image,caption\n00000.png,x\n")
    with pytest.raises(UserError, match="'file'"):
        ImageCaptionSource(str(folder), image_size=3, rng=np.random.default_rng(1))


def test_a_folder_whose_images_all_fail_to_decode_is_a_user_error(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"garbage")
    (folder / "captions.jsonl").write_text(json.dumps({"file": "a.jpg", "caption": "x"}) + "\n")
    source = ImageCaptionSource(str(folder), image_size=4, rng=np.random.default_rng(0))
    with pytest.warns(UserWarning), pytest.raises(UserError, match="no image .* decodes"):
        source.next_batch(1)


def add_member(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def files_under(root):
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


def test_tar_shards_skip_bad_samples_and_never_write_unsafe_members(tmp_path, monkeypatch):
    shards = tmp_path / "shards"
    shards.mkdir()
    absolute_target = tmp_path / "absolute_target.txt"
    with tarfile.open(shards / "data-000.tar", "w") as tar:
        add_member(tar, "sub", kind=tarfile.DIRTYPE)
        add_member(tar, "sub/000000.png", encode(solid("red")))
        add_member(tar, "sub/000000.txt", b"a red image\n")
        add_member(tar, "000001.jpg", encode(solid("green"), "JPEG"))
        add_member(tar, "000001.json", json.dumps({"caption": "a green image", "width": 12}).encode())
        add_member(tar, "000003.png", b"\x89PNG truncated")
        add_member(tar, "000003.txt", b"a corrupt image")
        add_member(tar, "../evil.txt", b"escaped")
        add_member(tar, str(absolute_target), b"escaped")
        add_member(tar, "000006.png", kind=tarfile.SYMTYPE, link=str(tmp_path / "link_target"))
        add_member(tar, "000007.png", kind=tarfile.CHRTYPE)
    with tarfile.open(shards / "data-001.tar", "w") as tar:
        add_member(tar, "000002.png", encode(solid("blue", width=6, height=14)))
        add_member(tar, "000002.json", json.dumps({"prompt": "a blue image"}).encode())
        add_member(tar, "000004.png", encode(solid("white")))
        add_member(tar, "000004.cls", b"3")
        add_member(tar, "000005.txt", b"a caption without its image")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    before = files_under(tmp_path)

    with pytest.warns(UserWarning, match="skipped"):
        source = ImageCaptionSource(str(shards / "data-{000..001}.tar"), image_size=4, rng=np.random.default_rng(2))
    with pytest.warns(UserWarning, match="000003.png"):
        pairs = seen_pairs(source, n_batches=3, batch_size=2)

    assert files_under(tmp_path) == before  # nothing extracted: not the escaping members, not the link
    assert not absolute_target.exists() and not (tmp_path / "evil.txt").exists()
    assert source.stats == {
        "samples": 4,  # 000000, 000001, 000002, 000003 (decodes badly, found when read)
        "no_caption": 1,  # 000004
        "no_image": 1,  # 000005
        "unreadable_images": 1,  # 000003
        "rejected_members": 4,  # ../evil.txt, the absolute path, the symlink, the device
        "unreadable_shards": 0,
    }
    assert sorted(caption for caption, _ in pairs[:3]) == ["a blue image", "a green image", "a red image"]
    for caption, image in pairs:
        colour = caption.split()[1]
        tolerance = 0.02 if colour == "green" else 0.0  # the green sample is a JPEG
        assert (image - expected_image(colour, 4)).abs().max() <= tolerance


def test_unreadable_shard_is_skipped_and_counted(tmp_path):
    with tarfile.open(tmp_path / "good.tar", "w") as tar:
        add_member(tar, "a.png", encode(solid("red")))
        add_member(tar, "a.txt", b"a red image")
    (tmp_path / "bad.tar").write_bytes(b"this is not a tar archive" * 40)
    with pytest.warns(UserWarning) as caught:
        source = ImageCaptionSource(str(tmp_path), image_size=2, rng=np.random.default_rng(0))
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 2 and "bad.tar' skipped" in messages[0] and "1 unreadable shards" in messages[1]
    assert source.stats["unreadable_shards"] == 1 and len(source) == 1
    assert source.next_batch(1)[0] == ["a red image"]


def test_brace_expansion_and_shard_resolution(tmp_path):
    assert expand_braces("data-{000..002}.tar") == ["data-000.tar", "data-001.tar", "data-002.tar"]
    assert expand_braces("s{8..10}-{a,b}") == ["s8-a", "s8-b", "s9-a", "s9-b", "s10-a", "s10-b"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(UserError, match="backwards"):
        expand_braces("{3..1}.tar")
    for number in range(3):
        (tmp_path / f"data-{number:03d}.tar").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    names = ["data-000.tar", "data-001.tar", "data-002.tar"]
    assert [p.name for p in resolve_shards(str(tmp_path))] == names
    assert [p.name for p in resolve_shards(str(tmp_path / "data-*.tar"))] == names
    assert [p.name for p in resolve_shards(str(tmp_path / "data-{001..002}.tar"))] == names[1:]
    with pytest.raises(UserError, match="data-003.tar' not found"):
        resolve_shards(str(tmp_path / "data-{002..003}.tar"))
    with pytest.raises(UserError, match="no .tar shards"):
        resolve_shards(str(tmp_path / "none-*.tar"))


def test_center_crop_keeps_the_central_square_of_non_square_images():
    columns, rows = np.meshgrid(np.arange(12), np.arange(4))
    landscape = np.stack([columns * 20, rows * 50, np.full_like(columns, 7)], axis=-1)
    image = decode_image(encode(landscape), size=4)  # 12x4 -> crop columns 4..7, no resize
    assert torch.equal(image * 255, torch.from_numpy(landscape[:, 4:8].transpose(2, 0, 1)).float())
    portrait = landscape.transpose(1, 0, 2)  # 4 wide, 12 high -> rows 4..7
    image = decode_image(encode(portrait), size=4)
    assert torch.equal(image * 255, torch.from_numpy(portrait[4:8].transpose(2, 0, 1)).float())

    wide = solid("blue", width=24, height=8)  # blue margins are cropped away before resizing
    wide[:, 8:12] = COLOURS["red"]
    wide[:, 12:16] = COLOURS["green"]
    image = decode_image(encode(wide), size=4)  # central 8x8 -> 4x4
    assert image.shape == (3, 4, 4) and image.min() >= 0 and image.max() <= 1
    assert torch.all(image[2] == 0)
    assert torch.equal(image, image[:, :1].expand(3, 4, 4))  # every row alike
    red, green = image[0, 0], image[1, 0]
    assert red[0] > 0.9 and green[0] < 0.1 and red[3] < 0.1 and green[3] > 0.9


def test_batches_are_seeded_and_resume_exactly(tmp_path):
    folder = colour_folder(tmp_path / "samples", list(COLOURS))

    def source(seed):
        return ImageCaptionSource(str(folder), image_size=2, rng=np.random.default_rng(seed))

    stream = [caption for caption, _ in seen_pairs(source(3), n_batches=4, batch_size=3)]
    assert stream == [caption for caption, _ in seen_pairs(source(3), n_batches=4, batch_size=3)]
    assert stream != [caption for caption, _ in seen_pairs(source(4), n_batches=4, batch_size=3)]
    all_captions = sorted(f"a {colour} image" for colour in COLOURS)
    assert sorted(stream[:5]) == sorted(stream[5:10]) == all_captions  # each epoch visits every sample once
    assert stream[:5] != stream[5:10]  # and is shuffled anew

    rng = np.random.default_rng(3)
    original = ImageCaptionSource(str(folder), image_size=2, rng=rng)
    original.next_batch(3)
    original.next_batch(3)  # mid-epoch 2
    state = json.loads(json.dumps(original.state_dict()))
    rng_state = copy.deepcopy(rng.bit_generator.state)
    expected = [original.next_batch(3) for _ in range(3)]  # runs into epoch 3 and 4

    resumed_rng = np.random.default_rng(999)
    resumed_rng.bit_generator.state = rng_state
    resumed = ImageCaptionSource(str(folder), image_size=2, rng=resumed_rng)
    resumed.load_state_dict(state)
    for (captions, images), (want_captions, want_images) in zip([resumed.next_batch(3) for _ in range(3)], expected):
        assert captions == want_captions and torch.equal(images, want_images)
    assert resumed.state_dict() == original.state_dict()

    with pytest.raises(UserError, match="same data"):
        resumed.load_state_dict({**state, "samples": 6})


def coco_file(path):
    annotations = [
        {"image_id": 7, "id": 1, "caption": "A cat on a  mat.\n"},
        {"image_id": 3, "id": 2, "caption": "Two dogs."},
        {"image_id": 7, "id": 3, "caption": "A sleeping cat."},
        {"image_id": 5, "id": 4, "caption": "A red bus."},
        {"image_id": 7, "id": 5, "caption": "A cat, indoors."},
        {"image_id": 3, "id": 6, "caption": "Dogs playing."},
    ]
    path.write_text(json.dumps({"images": [], "annotations": annotations}))
    return path


def test_coco_captions_one_per_image_seeded(tmp_path):
    path = coco_file(tmp_path / "captions_val.json")
    per_image = {
        7: {"A cat on a mat.", "A sleeping cat.", "A cat, indoors."},
        3: {"Two dogs.", "Dogs playing."},
        5: {"A red bus."},
    }
    captions = read_coco_captions(path, seed=0)
    assert len(captions) == 3
    assert sorted(next(i for i, group in per_image.items() if c in group) for c in captions) == [3, 5, 7]
    assert read_coco_captions(path, seed=0) == captions
    assert read_coco_captions(path, n=2, seed=0) == captions[:2]
    assert read_eval_prompts(path, n=2, seed=0) == captions[:2]
    draws = {tuple(read_coco_captions(path, seed=seed)) for seed in range(10)}
    assert len(draws) > 1  # the seed picks the captions and their order

    everything = read_coco_captions(path, one_per_image=False, seed=1)
    assert sorted(everything) == sorted(set.union(*per_image.values()))
    with pytest.raises(UserError, match="between 1 and 3"):
        read_coco_captions(path, n=4)
    (tmp_path / "bad.json").write_text(json.dumps({"annotations": [{"caption": "no image id"}]}))
    with pytest.raises(UserError, match="annotation 0"):
        read_coco_captions(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(UserError, match="expected COCO captions"):
        read_coco_captions(tmp_path / "list.json")


def test_prompt_files_for_evaluation_keep_file_order(tmp_path):
    (tmp_path / "prompts.txt").write_text("first\n\nsecond\nthird\n")
    assert read_eval_prompts(tmp_path / "prompts.txt") == ["first", "second", "third"]
    assert read_eval_prompts(tmp_path / "prompts.txt", n=2) == ["first", "second"]
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "one"}\n{"caption": "two"}\n')
    assert read_eval_prompts(tmp_path / "prompts.jsonl") == ["one", "two"]
