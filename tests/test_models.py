"""The tiny model is the real SD1.5 architecture: same LoRA-targetable module names as full size."""

import json
import time
from pathlib import Path

import pytest
import torch

from stylemix.lora.files import TEXT_TARGETS, UNET_TARGETS
from stylemix.models import (CONFIG_DIR, ModelLoadError, clip_tokenizer, full_size_meta_text_encoder,
                             full_size_meta_unet, load_model, pick_device, pick_dtype, tiny_components)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reference" / "sd15"


def lora_targets(model, targets):
    return sorted(n for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and any(n.endswith(t) for t in targets))


def test_tiny_lora_module_names_match_full_sd15():
    tiny = tiny_components()
    full_unet, full_te = full_size_meta_unet(), full_size_meta_text_encoder()
    assert next(full_unet.parameters()).device.type == "meta"
    tiny_u, full_u = lora_targets(tiny["unet"], UNET_TARGETS), lora_targets(full_unet, UNET_TARGETS)
    tiny_t, full_t = lora_targets(tiny["text_encoder"], TEXT_TARGETS), lora_targets(full_te, TEXT_TARGETS)
    assert tiny_u == full_u and len(full_u) == 128  # 16 transformer blocks x 2 attentions x 4 projections
    assert tiny_t == full_t and len(full_t) == 48  # 12 text-encoder layers x 4 projections
    # every Linear, not only the default targets, has the same name in both
    assert lora_targets(tiny["unet"], [""]) == lora_targets(full_unet, [""])
    assert sum(p.numel() for p in full_unet.parameters()) > 800e6
    assert sum(p.numel() for p in tiny["unet"].parameters()) < 5e6


def test_vendored_configs_are_the_reference_configs():
    if not SHARED.is_dir():
        pytest.skip("shared/reference/sd15 is not beside this checkout")
    for f in SHARED.glob("*.json"):
        assert json.loads((CONFIG_DIR / f.name).read_text()) == json.loads(f.read_text()), f.name


def test_tiny_is_deterministic():
    a, b = tiny_components(seed=0), tiny_components(seed=0)
    for (n, p), (_, q) in zip(a["unet"].named_parameters(), b["unet"].named_parameters()):
        assert torch.equal(p, q), n
    c = tiny_components(seed=1)
    assert not torch.equal(next(a["unet"].parameters()), next(c["unet"].parameters()))


def test_tokenizer_is_real_clip_bpe():
    import open_clip

    tok = clip_tokenizer()
    text = "a watercolor painting of a lighthouse, wcstyle"
    ids = tok(text).input_ids
    assert ids == [i for i in open_clip.tokenize([text])[0].tolist() if i != 0]
    assert tok.model_max_length == 77 and len(tok) == 49408


def test_tiny_generation_is_fast_and_deterministic(tiny_pipe):
    gen = lambda: tiny_pipe("a cat", num_inference_steps=4, width=64, height=64,  # noqa: E731
                            generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    a = gen()
    t = time.perf_counter()
    b = gen()
    elapsed = time.perf_counter() - t
    assert (a == b).all() and a.shape == (64, 64, 3) and a.std() > 0
    print(f"64x64 4-step generation on cpu: {elapsed:.3f}s")  # recorded, not asserted (bench/ has targets)


def test_missing_local_folder_gives_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="model_index.json missing.*--model tiny"):
        load_model(str(tmp_path / "nowhere"))


def test_unreachable_hub_id_gives_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load_model("stable-diffusion-v1-5/stable-diffusion-v1-5")
    msg = str(e.value)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in msg and "--model tiny" in msg and "\n" not in msg


def test_device_and_dtype_choice():
    assert pick_device("cpu").type == "cpu"
    assert pick_dtype(torch.device("cpu")) == torch.float32
    assert pick_dtype(torch.device("cuda")) == torch.float16
    assert pick_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="fp8"):
        pick_dtype(torch.device("cpu"), "fp8")
    if not torch.cuda.is_available():
        assert pick_device().type in ("cpu", "mps")


def test_load_model_is_cached():
    assert load_model("tiny") is load_model("tiny")


def test_local_diffusers_folder_loads_through_the_real_loading_code(tmp_path, tiny_pipe):
    """A folder saved with save_pretrained goes through from_pretrained, the same path a download takes."""
    import warnings

    folder = tmp_path / "my-sd15"
    tiny_pipe.save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated arguments on the loading path
        loaded = load_model(str(folder))
    assert not loaded.is_tiny and loaded.model_id == str(folder)
    gen = lambda p: p("a cat", num_inference_steps=2, width=64, height=64,  # noqa: E731
                      generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert (gen(loaded.pipe) == gen(tiny_pipe)).all()
