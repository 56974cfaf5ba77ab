"""Single-file SD1.5 checkpoints (original LDM layout) as base models: load offline, refuse by name."""

import json

import numpy as np
import pytest
import torch
from ldm_checkpoint import (pipeline_to_ldm, vae_to_ldm, write_header_only, write_ldm_checkpoint,
                            write_sparse_checkpoint)

from stylemix import checkpoints
from stylemix.checkpoints import inspect_checkpoint
from stylemix.models import ModelLoadError, clear_model_cache, load_model, tiny_components, tiny_pipeline


@pytest.fixture(autouse=True)
def fresh_models(monkeypatch, tmp_path):
    monkeypatch.delenv(checkpoints.VAE_ENV, raising=False)
    monkeypatch.setenv("STYLEMIX_HOME", str(tmp_path / "home"))
    clear_model_cache()
    yield
    clear_model_cache()


@pytest.fixture(scope="module")
def tiny():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def tiny_image(tiny):
    return image(tiny)


def image(pipe, seed: int = 3) -> np.ndarray:
    return pipe("a lighthouse at dusk", num_inference_steps=2, height=64, width=64, guidance_scale=7.5,
                generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]


def rounded_to(pipe, dtype: torch.dtype):
    """`pipe` with every weight rounded through `dtype` (what a half-precision file holds), back in fp32."""
    rounded = tiny_pipeline()
    for comp in ("unet", "text_encoder", "vae"):
        state = {k: v.to(dtype).to(v.dtype) if v.is_floating_point() else v
                 for k, v in getattr(pipe, comp).state_dict().items()}
        getattr(rounded, comp).load_state_dict(state)
    return rounded


# --------------------------------------------------------------------------- loading


def test_full_fp32_file_loads_offline_and_gives_the_tiny_image(tmp_path, tiny, tiny_image):
    path = write_ldm_checkpoint(tiny, tmp_path / "model.safetensors")
    loaded = load_model(str(path), "cpu", "fp32")
    for comp in ("unet", "text_encoder", "vae"):
        want, got = getattr(tiny, comp).state_dict(), getattr(loaded.pipe, comp).state_dict()
        assert set(want) == set(got), comp
        assert all(torch.equal(want[k], got[k]) for k in want), comp
    assert np.array_equal(image(loaded.pipe), tiny_image)
    assert loaded.pipe.safety_checker is None
    # a tiny-width file is never passed off as a real model
    assert loaded.arch == "tiny" and loaded.is_tiny
    assert "tiny-width" in loaded.description and "model.safetensors" in loaded.description
    assert "fp32 weights" in loaded.description and "baked-in VAE" in loaded.description
    assert load_model(str(path), "cpu", "fp32") is loaded  # cached


def test_ema_only_fp16_file_loads_into_fp32(tmp_path, tiny, tiny_image):
    # an EMA-only prune keeps its (EMA) weights under model.diffusion_model.*, in fp16
    path = write_ldm_checkpoint(tiny, tmp_path / "ema-only-fp16.safetensors", dtype=torch.float16)
    loaded = load_model(str(path), "cpu", "fp32")
    assert next(loaded.pipe.unet.parameters()).dtype == torch.float32
    assert "fp16 weights" in loaded.description
    got = image(loaded.pipe)
    assert np.array_equal(got, image(rounded_to(tiny, torch.float16)))  # exactly the fp16 weights
    assert np.abs(got - tiny_image).max() <= 1 / 255


def test_file_with_ema_and_non_ema_weights_runs_on_the_ema_ones(tmp_path, tiny, tiny_image):
    other = tiny_components(seed=1)["unet"].state_dict()  # different non-EMA weights
    path = write_ldm_checkpoint(tiny, tmp_path / "full-ema.safetensors", ema="both", other_unet=other)
    info = inspect_checkpoint(path)
    assert info.has_ema and info.has_vae and info.arch == "tiny"
    loaded = load_model(str(path), "cpu", "fp32")
    assert "EMA weights" in loaded.description
    assert np.array_equal(image(loaded.pipe), tiny_image)


def test_file_without_vae_uses_stylemix_vae(tmp_path, tiny, tiny_image, monkeypatch):
    path = write_ldm_checkpoint(tiny, tmp_path / "no-vae.safetensors", vae=False)
    assert not inspect_checkpoint(path).has_vae
    # a diffusers VAE folder ...
    tiny.vae.save_pretrained(tmp_path / "vae-folder")
    monkeypatch.setenv(checkpoints.VAE_ENV, str(tmp_path / "vae-folder"))
    loaded = load_model(str(path), "cpu", "fp32")
    assert np.array_equal(image(loaded.pipe), tiny_image)
    assert "VAE from" in loaded.description and "vae-folder" in loaded.description
    # ... or a standalone LDM VAE file (keys without first_stage_model.), like vae-ft-mse-840000
    from safetensors.torch import save_file

    vae_state = {k.removeprefix("first_stage_model."): v for k, v in pipeline_to_ldm(tiny).items()
                 if k.startswith("first_stage_model.")}
    assert len(vae_state) == len(tiny.vae.state_dict())
    save_file(vae_state, str(tmp_path / "vae.safetensors"))
    monkeypatch.setenv(checkpoints.VAE_ENV, str(tmp_path / "vae.safetensors"))
    loaded2 = load_model(str(path), "cpu", "fp32")  # another $STYLEMIX_VAE is another model
    assert loaded2 is not loaded
    assert np.array_equal(image(loaded2.pipe), tiny_image)


def test_file_without_vae_offline_says_what_to_do(tmp_path, tiny, monkeypatch):
    path = write_ldm_checkpoint(tiny, tmp_path / "no-vae.safetensors", vae=False)
    # a repo that is in no local Hub cache: offline (HF_HUB_OFFLINE=1 in conftest) it cannot be fetched
    monkeypatch.setattr(checkpoints, "DEFAULT_MODEL", "stylemix-tests/not-cached-sd15")
    with pytest.raises(ModelLoadError, match=r"no-vae.safetensors has no baked-in VAE.*STYLEMIX_VAE"):
        load_model(str(path), "cpu", "fp32")
    monkeypatch.setenv(checkpoints.VAE_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ModelLoadError, match="neither a VAE .safetensors file nor a diffusers VAE folder"):
        load_model(str(path), "cpu", "fp32")
    torch.save({}, str(tmp_path / "vae.pt"))
    monkeypatch.setenv(checkpoints.VAE_ENV, str(tmp_path / "vae.pt"))
    with pytest.raises(ModelLoadError, match=r"Cannot use vae.pt as the VAE \(STYLEMIX_VAE\): '.pt' is a pickle"):
        load_model(str(path), "cpu", "fp32")


def test_cli_generates_the_same_png_from_the_file_as_from_tiny(tmp_path, tiny, monkeypatch):
    from PIL import Image

    from stylemix.cli import main

    path = write_ldm_checkpoint(tiny, tmp_path / "model.safetensors")
    outs = {}
    for name, model in (("file", str(path)), ("tiny", "tiny")):
        outs[name] = tmp_path / f"{name}.png"
        args = ["--model", model, "--device", "cpu", "generate", "a cat", "--steps", "2", "--size", "64x64",
                "--seed", "5", "--out", str(outs[name]), "--no-score"]
        assert main(args) == 0
    assert Image.open(outs["file"]).tobytes() == Image.open(outs["tiny"]).tobytes()
    # STYLEMIX_MODEL works the same way
    monkeypatch.setenv("STYLEMIX_MODEL", str(path))
    assert load_model(None, "cpu", "fp32").model_id == str(path)


def test_incomplete_file_is_refused_by_name(tmp_path, tiny):
    from safetensors.torch import save_file

    state = pipeline_to_ldm(tiny)
    del state["model.diffusion_model.out.2.weight"]
    save_file(state, str(tmp_path / "cut.safetensors"))
    with pytest.raises(ModelLoadError, match=r"cut.safetensors as a base model: it is incomplete: its UNet \(model.diffusion_model.\*\) has 683 "):
        load_model(str(tmp_path / "cut.safetensors"), "cpu", "fp32")


# --------------------------------------------------------------------------- refusals (header only)

U = "model.diffusion_model."
TEXT = "cond_stage_model.transformer.text_model."


def sd15_like(in_channels: int = 4, context: int = 768, width: int = 320) -> dict[str, list[int]]:
    """The few keys the header check reads, at real SD1.5 shapes (tensors of zeros, a few MB)."""
    shapes = {f"{U}input_blocks.0.0.weight": [width, in_channels, 3, 3],
              f"{U}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": [width, context],
              f"{TEXT}embeddings.token_embedding.weight": [8, 768],
              f"{TEXT}encoder.layers.0.mlp.fc1.weight": [3072, 8]}
    for i, w in zip((1, 4, 7, 10), (width, 640, 1280, 1280)):
        shapes[f"{U}input_blocks.{i}.0.out_layers.3.weight"] = [w, 1, 1, 1]
    for n in range(12):
        shapes[f"{TEXT}encoder.layers.{n}.layer_norm1.weight"] = [768]
    return shapes


REFUSALS = {
    "sdxl": ({**sd15_like(context=2048),
              "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": [77, 768],
              "conditioner.embedders.1.model.positional_embedding": [77, 1280]}, "is an SDXL checkpoint"),
    "sd2": ({**{k: v for k, v in sd15_like(context=1024).items() if not k.startswith("cond_stage_model.")},
             "cond_stage_model.model.token_embedding.weight": [8, 1024]}, r"is a Stable Diffusion 2\.x checkpoint"),
    "inpainting": (sd15_like(in_channels=9), "is an inpainting checkpoint .*9 input channels"),
    "unknown-widths": (sd15_like(width=192), r"widths \(UNet \[192, 640, 1280, 1280\].*match no known SD1.5"),
    "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": [4, 320]}, "is a LoRA, not a base model"),
}


@pytest.mark.parametrize("kind", list(REFUSALS))
def test_other_models_are_refused_naming_what_they_are(tmp_path, kind, capsys):
    from stylemix.cli import main

    shapes, message = REFUSALS[kind]
    path = write_header_only(tmp_path / f"{kind}.safetensors", shapes)
    with pytest.raises(ModelLoadError, match=message):
        inspect_checkpoint(path)
    assert main(["--model", str(path), "--device", "cpu", "generate", "x", "--no-score"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stylemix: error: Cannot use") and f"{kind}.safetensors" in err[0]


def test_a_full_size_sd15_file_is_recognised_from_its_header_alone(tmp_path):
    from types import SimpleNamespace

    from stylemix.models import full_size_meta_text_encoder, full_size_meta_unet

    with torch.device("meta"):
        from diffusers import AutoencoderKL

        from stylemix.models import sd15_configs

        vae = AutoencoderKL(**sd15_configs()["vae"])
    real = SimpleNamespace(unet=full_size_meta_unet(), text_encoder=full_size_meta_text_encoder(), vae=vae)
    state = pipeline_to_ldm(real, dtype=torch.float16)
    # a 2 GB fp16 file whose data was never written: only its header can be read
    path = write_sparse_checkpoint(tmp_path / "v1-5-pruned-emaonly-fp16.safetensors", state)
    assert path.stat().st_size > 1.9e9
    info = inspect_checkpoint(path)
    assert info.arch == "sd15" and info.has_vae and not info.has_ema and info.weights_dtype == "fp16"
    assert "tiny" not in info.summary and info.summary.startswith("SD1.5 single file")
    # the same file without its VAE, and one with a weight missing
    no_vae = {k: v for k, v in state.items() if not k.startswith("first_stage_model.")}
    assert not inspect_checkpoint(write_sparse_checkpoint(tmp_path / "novae.safetensors", no_vae)).has_vae
    cut = {k: v for k, v in state.items() if k != "cond_stage_model.transformer.text_model.final_layer_norm.bias"}
    with pytest.raises(ModelLoadError, match=r"incomplete: its text encoder .* has 195 weights where SD1.5 has 196"):
        inspect_checkpoint(write_sparse_checkpoint(tmp_path / "cut.safetensors", cut))


@pytest.mark.parametrize("name", ["model.ckpt", "model.safetensors"])
def test_pickles_are_never_opened(tmp_path, name, capsys):
    from stylemix.cli import main

    path = tmp_path / name
    # a pickle that would leave a trace if it were ever unpickled
    torch.save({"state_dict": {}, "boom": Boom(tmp_path / "ran")}, str(path))
    what = "is a pickle checkpoint" if name.endswith(".ckpt") else "is a pickle/PyTorch checkpoint with a .safetensors"
    with pytest.raises(ModelLoadError, match=f"{what}.*sandbox") as e:
        load_model(str(path), "cpu", "fp32")
    assert name in str(e.value) and ".safetensors release" in str(e.value)
    assert main(["--model", str(path), "generate", "x", "--no-score"]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "ran").exists()


class Boom:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ModelLoadError, match="no such checkpoint file"):
        load_model(str(tmp_path / "gone.safetensors"), "cpu", "fp32")


def test_app_banner_shows_the_refusal(tmp_path, workspace):
    from stylemix.service import StyleMixService

    path = write_header_only(tmp_path / "xl.safetensors", REFUSALS["sdxl"][0])
    service = StyleMixService.start(str(path), workspace, device="cpu", dtype="fp32", examples=False)
    assert service.mixer.loaded.model_id == "tiny"
    assert "xl.safetensors" in service.fallback_reason and "SDXL" in service.fallback_reason
    assert "could not be loaded" in service.banner and "is an SDXL checkpoint" in service.banner


def test_ldm_converter_covers_every_weight(tiny):
    state = pipeline_to_ldm(tiny, dtype=torch.float32)
    n = sum(len(getattr(tiny, c).state_dict()) for c in ("unet", "text_encoder", "vae")) + 1  # + position_ids
    assert len(state) == n
    assert vae_to_ldm("decoder.up_blocks.0.resnets.0.conv1.weight") == "decoder.up.3.block.0.conv1.weight"
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in state  # upsampler after a plain resnet
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in state  # upsampler after resnet + attention
    assert json.dumps(sorted(state))  # plain string keys


def test_trainer_loads_the_same_file(tmp_path, tiny):
    from trainers.lora import load_training_components

    path = write_ldm_checkpoint(tiny, tmp_path / "model.safetensors", dtype=torch.float16)
    comps = load_training_components(str(path))
    for comp in ("unet", "text_encoder", "vae"):
        assert next(comps[comp].parameters()).dtype == torch.float32  # trained in fp32 whatever the file holds
    want = rounded_to(tiny, torch.float16).unet.state_dict()
    assert all(torch.equal(want[k], v) for k, v in comps["unet"].state_dict().items())
    assert type(comps["noise_scheduler"]).__name__ == "DDPMScheduler"
    assert comps["noise_scheduler"].config.beta_schedule == "scaled_linear"
    with pytest.raises(ModelLoadError, match="is a pickle checkpoint"):
        load_training_components(str(tmp_path / "model.ckpt"))
