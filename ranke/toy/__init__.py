"""The toy shapes world: procedurally generated captioned images and an exact verifier.

scenes   what is in an image (objects, background) and the scene sampler
render   scene -> anti-aliased uint8 pixels
captions caption grammar, its parser and vocabulary
verifier pixels + caption -> per-object and whole-prompt correctness (the toy GenEval)
data     training stream, held-out prompts, reference images
tools    write a sample folder, verify a folder of images
"""

from ranke.toy.captions import VOCABULARY, CaptionSpec, caption_for, caption_words, parse_caption
from ranke.toy.data import (
    ToyConfig,
    heldout_prompts,
    heldout_scenes,
    reference_images,
    render_caption,
    train_batch,
)
from ranke.toy.render import render_scene, render_scenes
from ranke.toy.scenes import COLORS, RELATIONS, SHAPES, SIZES, ObjectSpec, Scene, sample_scene
from ranke.toy.verifier import Detection, VerifierResult, detect_objects, score_image, summarize

__all__ = [
    "COLORS", "RELATIONS", "SHAPES", "SIZES", "VOCABULARY",
    "CaptionSpec", "Detection", "ObjectSpec", "Scene", "ToyConfig", "VerifierResult",
    "caption_for", "caption_words", "detect_objects", "heldout_prompts", "heldout_scenes",
    "parse_caption", "reference_images", "render_caption", "render_scene", "render_scenes",
    "sample_scene", "score_image", "summarize", "train_batch",
]
