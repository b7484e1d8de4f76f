import pytest

from ranke import config as config_lib
from ranke.config import RunConfig
from ranke.runtime import UserError


def test_defaults_are_the_toy_presets():
    cfg = config_lib.load(RunConfig, "toy")
    assert cfg.vq.codebook_size == cfg.gpt.vocab_size
    assert cfg.device == "cpu"


def test_bare_key_resolves_in_the_recipe_section_then_top_level():
    cfg = config_lib.load(RunConfig, "toy", ["steps=7", "seed=3"], section="tokenizer")
    assert cfg.tokenizer.steps == 7
    assert cfg.sft.steps != 7
    assert cfg.seed == 3


def test_dotted_key_and_yaml_values():
    cfg = config_lib.load(RunConfig, "toy", ["vq.codebook_size=512", "tokenizer.betas=[0.5, 0.9]"])
    assert cfg.vq.codebook_size == 512
    assert cfg.tokenizer.betas == (0.5, 0.9)
    # other fields of the nested preset keep their defaults
    assert cfg.vq.codebook_embed_dim == RunConfig().vq.codebook_embed_dim


def test_unknown_key_suggests_the_closest_one():
    with pytest.raises(UserError, match=r"unknown config key 'stpes'.*did you mean 'steps'"):
        config_lib.load(RunConfig, "toy", ["stpes=3"], section="sft")


def test_unknown_key_in_yaml_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tokenizer:\n  batch_szie: 4\n")
    with pytest.raises(UserError, match=r"tokenizer.batch_szie.*batch_size"):
        config_lib.load(RunConfig, str(path))


def test_wrong_type_is_a_one_line_error():
    with pytest.raises(UserError, match="must be int"):
        config_lib.load(RunConfig, "toy", ["steps=many"], section="sft")


def test_missing_config_file_names_the_presets():
    with pytest.raises(UserError, match="toy"):
        config_lib.load(RunConfig, "nope.yaml")


def test_saved_config_loads_back_identically(tmp_path):
    cfg = config_lib.load(RunConfig, "toy", ["steps=11", "vq.codebook_size=256"], section="sft")
    config_lib.save(cfg, tmp_path / "config.yaml")
    assert config_lib.load(RunConfig, str(tmp_path / "config.yaml")) == cfg


def test_override_of_a_section_absent_from_the_yaml():
    cfg = config_lib.load(RunConfig, "toy", ["gpt.vocab_size=64", "gpt.dim=48"])
    assert (cfg.gpt.vocab_size, cfg.gpt.dim) == (64, 48)


def test_exponent_without_dot_is_a_float():
    cfg = config_lib.load(RunConfig, None, ["posttrain.policy_lr=1e-4"])
    assert cfg.posttrain.policy_lr == 1e-4
    with pytest.raises(UserError, match="must be float"):
        config_lib.load(RunConfig, None, ["posttrain.policy_lr=fast"])


@pytest.mark.parametrize(
    "preset, backbone, cfg_scale, policy_lr, consistency, reward_weight, reward",
    [
        ("llamagen_xl_clip", "llamagen", 6.0, 1e-5, 10.0, 0.01, "clip"),
        ("llamagen_xl_hpsv2", "llamagen", 6.0, 1e-5, 10.0, 0.1, "hpsv2"),
        ("janus_pro_1b_clip", "janus", 5.0, 1e-4, 5.0, 0.05, "clip"),
    ],
)
def test_paper_presets_hold_the_reference_values(preset, backbone, cfg_scale, policy_lr, consistency, reward_weight, reward):
    """METHOD.md section 5: CFG, learning rates, loss weights, batch and precision of each reference run."""
    cfg = config_lib.load(RunConfig, preset)
    post = cfg.posttrain
    assert cfg.backbone.kind == backbone and cfg.sampling.cfg_scale == cfg_scale and cfg.sampling.top_k == 1000
    assert cfg.precision == "bf16"
    assert (post.prompts_per_step, post.group_size, post.mode) == (32, 8, "both")
    assert (post.policy_lr, post.decoder_lr, post.disc_lr) == (policy_lr, 5e-5, 2e-5)
    assert (post.consistency_weight, post.reward_backprop_weight, post.kl_coef) == (consistency, reward_weight, 0.05)
    assert list(post.rewards) == [reward] and post.perceptual == "lpips" and post.rank_top_k == 1
