"""Issue 17 "Train like kohya_ss", trainer side: buckets, networks, optimisers, caption options, epoch versions,
smoothed loss and TensorBoard.  Each option is checked for its effect on the tiny model (64 px, rank 4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from layout_files import layer_modules
from stylemix.errors import StyleMixError
from stylemix.lora.files import WEIGHTS_NAME, adapter_state
from stylemix.lora.library import LoraLibrary
from stylemix.lora.names import canonical_text_encoder_key, pipeline_targets
from stylemix.mixer import Mixer
from stylemix.models import LoadedModel, tiny_components, tiny_pipeline
from stylemix.paths import check_lora_name, check_name
from stylemix.recipe import Recipe
from test_trainer import make_dataset, tiny_config
from trainers import batches, captions, networks, optim
from trainers.lora import TrainConfig, latest_checkpoint, train

RECIPE = Recipe(prompt="sksstyle, a house", steps=2, width=64, height=64, seed=3, sampler="Euler")


def make_bucketed_dataset(folder: Path, sizes: list[tuple[int, int]], resolution: int = 128) -> Path:
    """Images stored at their bucket's size, metadata with `bucket`/`original_size`, as `stylemix preprocess` writes."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (w, h) in enumerate(sizes):
        x = np.zeros((h, w, 3), np.uint8)
        x[:, :, i % 3] = 180
        x[:: 6 + i] = 255
        Image.fromarray(x).save(folder / f"img{i}.png")
        rows.append(json.dumps({"file_name": f"img{i}.png", "text": f"sksstyle, picture {i}, stripes, red",
                                "original_size": [w * 2, h * 2], "bucket": [w, h]}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    (folder / "dataset.json").write_text(json.dumps({"style": "s", "trigger_word": "sksstyle", "size": resolution,
                                                     "count": len(sizes)}))
    return folder


# --------------------------------------------------------------------------- buckets


def test_one_size_dataset_gives_todays_batches_and_loss_curve(tmp_path):
    # the batches of a one-bucket set are exactly the plain seeded shuffle used before buckets
    for n, batch, epoch, multiple in [(4, 2, 0, 1), (7, 3, 5, 2), (10, 4, 1, 3)]:
        g = torch.Generator().manual_seed(42 * 100_003 + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        old = [perm[i:i + batch] for i in range(0, n, batch)]
        old += old[:(-len(old)) % multiple]
        assert batches.epoch_batches([list(range(n))], batch, 42, epoch, multiple) == old
    # and a pinned loss curve: a change to the draws or the batches shows here.  Recorded when each sample got
    # its own seed (issue 18; before it, the curve of the commit before buckets was
    # [1.052283, 1.001646, 1.111973, 1.060468, 0.990018], with the same batches)
    make_dataset(tmp_path / "data", size=96)
    r = train(tiny_config(tmp_path, "same", max_steps=5), tmp_path / "job")
    before = [[1, 1.059143], [2, 1.113735], [3, 1.026652], [4, 1.036916], [5, 0.95641]]
    assert np.allclose(r.loss_curve, before, atol=1e-4), r.loss_curve


def test_bucket_batches_hold_one_bucket_and_every_image_once_per_epoch():
    sizes = [(64, 64)] * 5 + [(48, 80)] * 3 + [(80, 48)] * 4
    groups = batches.bucket_groups(sizes)
    assert {s: len(m) for s, m in groups.items()} == {(48, 80): 3, (64, 64): 5, (80, 48): 4}
    orders = set()
    for epoch in range(6):
        epoch_b = batches.epoch_batches(list(groups.values()), 2, 7, epoch, 1)
        assert all(len({sizes[i] for i in b}) == 1 for b in epoch_b)  # one bucket per batch
        assert sorted(i for b in epoch_b for i in b) == list(range(12))  # every image once
        orders.add(tuple(sizes[b[0]] for b in epoch_b))
    assert len(orders) > 1  # the bucket order is shuffled from epoch to epoch
    # padding to a multiple of (processes x accumulation) repeats whole batches, still one bucket each
    padded = batches.epoch_batches(list(groups.values()), 2, 7, 0, 4)
    assert len(padded) % 4 == 0 and all(len({sizes[i] for i in b}) == 1 for b in padded)
    # a 512 set's buckets trained at 128: scaled by 1/4, sides multiples of 8, aspect kept
    assert batches.training_sizes([(384, 640), (512, 512), (704, 320)], 512, 128) == [(96, 160), (128, 128), (176, 80)]
    assert batches.training_sizes([(384, 640)], 512, 512) == [(384, 640)]


def test_bucketed_dataset_trains_with_and_without_the_latent_cache(tmp_path):
    make_bucketed_dataset(tmp_path / "data", [(128, 128), (128, 128), (64, 192), (64, 192), (192, 64)])
    common = dict(max_steps=3, resolution=64, train_text_encoder=False)
    cached = train(tiny_config(tmp_path, "b1", **common), tmp_path / "j1")
    uncached = train(tiny_config(tmp_path, "b2", cache_latents=False, **common), tmp_path / "j2")
    assert len(cached.loss_curve) == 3 and np.allclose(uncached.loss_curve, cached.loss_curve, atol=1e-4)
    meta = json.loads((cached.lora_dir / "stylemix.json").read_text())
    assert meta["dataset"]["buckets"] == {"128x128": 2, "64x192": 2, "192x64": 1}


# --------------------------------------------------------------------------- networks


def _kohya_layers(unet, text_encoder) -> dict[str, dict[str, int]]:
    """kohya's networks/lora.py rule, written out: Linear and Conv2d children of these module classes."""
    out = {"attention": {}, "conv3x3": {}, "resnet_other": {}, "text": {}}
    for root, classes in ((unet, ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")),
                          (text_encoder, ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"))):
        for name, module in root.named_modules():
            if type(module).__name__ not in classes:
                continue
            for child, m in module.named_modules():
                if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
                    continue
                full = f"{name}.{child}"
                if root is text_encoder:
                    out["text"][full] = 1
                elif type(module).__name__ == "Transformer2DModel":
                    out["attention"][full] = 1
                elif isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1):
                    out["conv3x3"][full] = 1
                else:
                    out["resnet_other"][full] = 1
    return out


def _lora_layers(model) -> dict[str, int]:
    from peft.tuners.lora import LoraLayer

    return {n: m.r[networks.ADAPTER] for n, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("network", ["attention", "kohya", "locon"])
def test_networks_cover_exactly_the_layers_named(network):
    comps = tiny_components()
    kohya = _kohya_layers(comps["unet"], comps["text_encoder"])
    config = TrainConfig(network=network, rank=4, alpha=4, conv_rank=2, conv_alpha=1)
    networks.add_networks(config, comps["unet"], comps["text_encoder"])
    unet, text = _lora_layers(comps["unet"]), _lora_layers(comps["text_encoder"])
    attn_only = {n for n in kohya["attention"] if ".attn1." in n or ".attn2." in n}
    text_attn = {n for n in kohya["text"] if ".self_attn." in n}
    expected_unet = {"attention": attn_only, "kohya": set(kohya["attention"]),
                     "locon": set(kohya["attention"]) | set(kohya["conv3x3"]) | set(kohya["resnet_other"])}[network]
    expected_text = text_attn if network == "attention" else set(kohya["text"])
    assert set(unet) == expected_unet and set(text) == expected_text
    # counted on the tiny model (SD1.5's layout): 16 transformer blocks x 2 attentions x 4 projections,
    # + ff (2) + proj_in/out (2) each; locon + 22 resnets x (conv1, conv2, time_emb_proj), 13 shortcuts
    # (the tiny widths: the first resnet of down block 1 and all 12 up resnets change width), 3 + 3 samplers;
    # text: 12 layers x 4 attention projections (+ 2 MLP)
    assert len(unet) == {"attention": 128, "kohya": 192, "locon": 192 + 22 * 3 + 13 + 6}[network]
    assert len(text) == {"attention": 48, "kohya": 72, "locon": 72}[network]
    # LoCon's conv rank is the rank of the 3x3 convs, and only theirs; their scale is conv_alpha / conv_rank
    for n, r in unet.items():
        assert r == (2 if n in kohya["conv3x3"] else 4), n
    if network == "locon":
        conv = comps["unet"].get_submodule(next(iter(kohya["conv3x3"])))
        assert conv.lora_A[networks.ADAPTER].weight.shape[:2] == (2, conv.base_layer.in_channels)
        assert conv.scaling[networks.ADAPTER] == 0.5


def _random_trained_lora(network: str, lib: LoraLibrary, name: str, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA made by the trainer's own code (networks + adapter_state), its B weights set at random so it
    visibly changes images; returns each layer's ΔW as peft computes it (canonical keys)."""
    comps = tiny_components()
    config = TrainConfig(network=network, rank=4, alpha=2, conv_rank=2, conv_alpha=1)
    networks.add_networks(config, comps["unet"], comps["text_encoder"])
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for prefix, model in (("unet", comps["unet"]), ("text_encoder", comps["text_encoder"])):
        for n, m in model.named_modules():
            if hasattr(m, "lora_B") and networks.ADAPTER in m.lora_B:
                b = m.lora_B[networks.ADAPTER].weight
                with torch.no_grad():
                    b.copy_(torch.randn(b.shape, generator=g) * 0.3)
                key = canonical_text_encoder_key(f"{prefix}.{n}")
                deltas[key] = m.get_delta_weight(networks.ADAPTER).detach().double()
    state, header = adapter_state(comps["unet"], comps["text_encoder"], networks.ADAPTER)
    lib.add(name, state, header, {"trigger_word": "sksstyle", "alpha": 2.0, "rank": 4,
                                  **networks.library_meta(config)})
    return deltas


@pytest.mark.parametrize("network", ["attention", "kohya", "locon"])
def test_every_network_imports_mixes_exactly_and_exports_to_kohya_for_plain_diffusers(tmp_path, network):
    pipe = tiny_pipeline()
    modules = layer_modules(pipe, attn=True, conv=True, te=True)
    originals = {p: m.weight.detach().clone() for p, m in modules.items()}
    lib = LoraLibrary(tmp_path / "loras", targets=pipeline_targets(pipe))
    deltas = _random_trained_lora(network, lib, "net", seed=1)
    assert deltas and set(deltas) <= set(modules)
    mixer = Mixer(LoadedModel(pipe, "tiny", torch.device("cpu"), torch.float32), lib)

    def image(name, w=1.0):
        return np.asarray(mixer.generate(RECIPE.with_(loras={name: w})).images[0], dtype=np.int16)

    base, styled = image("net", 0.0), image("net")
    assert np.abs(styled - base).max() > 10  # it changes the picture
    # mixes exactly: W + 0.7 ΔW in every layer it trains
    mixer.set_weights({"net": 0.7})
    mixer.apply()
    for p, d in deltas.items():
        w = modules[p].weight.detach()
        torch.testing.assert_close(w.reshape(w.shape[0], -1).double(),
                                   originals[p].double().reshape(w.shape[0], -1) + 0.7 * d.reshape(w.shape[0], -1),
                                   rtol=1e-5, atol=1e-5)
    # kohya export: imports back to the same image, and plain diffusers loads it with the same pixels
    out = lib.export("net", tmp_path / "net-kohya.safetensors", fmt="kohya")
    back = lib.import_file(out, "back")
    assert back.meta["source"]["format"] == "kohya" and back.summary()["kind"] == ("LoCon" if network == "locon" else "LoRA")
    assert np.abs(image("back") - styled).max() <= 1
    plain = tiny_pipeline()
    from diffusers import EulerDiscreteScheduler

    plain.scheduler = EulerDiscreteScheduler.from_config(plain.scheduler.config)
    plain.load_lora_weights(str(out), adapter_name="k")
    g = torch.Generator().manual_seed(RECIPE.seed)
    pixels = np.asarray(plain(RECIPE.prompt, num_inference_steps=2, guidance_scale=RECIPE.guidance, width=64,
                              height=64, generator=g).images[0], dtype=np.int16)
    assert np.abs(pixels - styled).max() <= 1


# --------------------------------------------------------------------------- optimisers


def test_prodigy_changes_the_weights_and_adapts_d(caplog):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(8))
    target = torch.linspace(-1, 1, 8)
    opt = optim.make_optimizer(TrainConfig(optimizer="prodigy", learning_rate=1.0), [w])
    d0 = opt.param_groups[0]["d"]
    for _ in range(30):
        loss = ((w - target) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert opt.param_groups[0]["d"] > 100 * d0  # the step size it found, far above its start
    assert ((w.detach() - target) ** 2).sum() < 0.5 * (target ** 2).sum()  # and it moved toward the answer
    assert optim.effective_lr(opt) == pytest.approx(opt.param_groups[0]["d"])
    # d_coef scales the estimate
    w2 = torch.nn.Parameter(torch.zeros(8))
    opt2 = optim.make_optimizer(TrainConfig(optimizer="prodigy", learning_rate=1.0, prodigy_d_coef=0.1), [w2])
    assert opt2.param_groups[0]["d_coef"] == 0.1
    # an AdamW-sized learning rate left in place for Prodigy is named
    with caplog.at_level("WARNING", logger="stylemix.train"):
        optim.make_optimizer(TrainConfig(optimizer="prodigy", learning_rate=1e-4), [w2])
    assert any("--learning-rate 1.0" in m for m in caplog.messages)


def test_prodigy_kohya_run_with_caption_options_logs_smoothed_loss_lr_and_tensorboard(tmp_path):
    make_dataset(tmp_path / "data")
    infos = []
    cfg = tiny_config(tmp_path, "prod", network="kohya", optimizer="prodigy", learning_rate=1.0, max_steps=3,
                      train_text_encoder=False, shuffle_caption=True, caption_tag_dropout_rate=0.5,
                      checkpoint_every=3, lr_scheduler="constant")
    r = train(cfg, tmp_path / "job", progress=infos.append)
    # Prodigy ran (its state is in the checkpoint; d's growth is the test above) and the LoRA moved from its zero B
    from safetensors import safe_open

    with safe_open(str(latest_checkpoint(tmp_path / "job") / "optimizer.safetensors"), "pt") as f:
        groups = json.loads(f.metadata()["state"])["param_groups"]
    assert groups[0]["d_coef"] == 1.0 and "d_numerator" in groups[0]
    from safetensors.torch import load_file

    w = load_file(str(r.lora_dir / WEIGHTS_NAME))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in w.items())
    assert any(".ff.net.2." in k for k in w) and not any(k.startswith("text_encoder") for k in w)
    # the smoothed loss and the learning rate in the progress info and its curves
    last = [i for i in infos if i.get("phase") == "training"][-1]
    losses = [loss for _, loss in r.loss_curve]
    ema, n = 0.0, 0
    for loss in losses:
        n += 1
        ema = 0.9 * ema + 0.1 * loss
    assert last["loss_ema"] == pytest.approx(ema / (1 - 0.9 ** n), abs=1e-5)
    assert [s for s, _ in last["loss_ema_curve"]] == [1, 2, 3] and last["loss_ema_curve"][0][1] == pytest.approx(losses[0], abs=1e-5)
    assert len(last["lr_curve"]) == 3 and last["lr"] == pytest.approx(groups[0]["d"], rel=1e-4)
    # TensorBoard: the job folder's event file holds the loss scalar of every step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "job" / "logs" / "train"))
    acc.Reload()
    assert {"loss", "loss_ema", "lr"} <= set(acc.Tags()["scalars"])
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("loss")] == [(s, round(v, 4)) for s, v in r.loss_curve]


# --------------------------------------------------------------------------- captions


def test_keep_tokens_never_moves_the_trigger_word_and_shuffle_does_shuffle():
    caption = "sksstyle, red, stripes, a cat, night, blue sky"
    opts = captions.CaptionOptions(shuffle=True, keep_tokens=2, tag_dropout_rate=0.3)
    seen = set()
    for seed in range(300):
        out = captions.split_tags(captions.process_caption(caption, opts, torch.Generator().manual_seed(seed)))
        assert out[:2] == ["sksstyle", "red"]  # kept tokens: never moved, never dropped
        assert set(out[2:]) <= {"stripes", "a cat", "night", "blue sky"} and len(set(out)) == len(out)
        seen.add(tuple(out[2:]))
    assert len(seen) > 20  # the rest is shuffled and thinned
    # without tag dropout, shuffling keeps every tag
    full = captions.CaptionOptions(shuffle=True, keep_tokens=1)
    for seed in range(50):
        out = captions.split_tags(captions.process_caption(caption, full, torch.Generator().manual_seed(seed)))
        assert out[0] == "sksstyle" and sorted(out) == sorted(captions.split_tags(caption))


def test_caption_dropout_rate_one_gives_empty_captions_and_tag_dropout_keeps_kept_tokens():
    caption = "sksstyle, red, stripes"
    drop_all = captions.CaptionOptions(dropout_rate=0.999999)
    assert all(captions.process_caption(caption, drop_all, torch.Generator().manual_seed(s)) == "" for s in range(50))
    tags_all = captions.CaptionOptions(keep_tokens=1, tag_dropout_rate=0.999999)
    assert all(captions.process_caption(caption, tags_all, torch.Generator().manual_seed(s)) == "sksstyle"
               for s in range(50))
    half = captions.CaptionOptions(dropout_rate=0.5)
    empty = sum(captions.process_caption(caption, half, torch.Generator().manual_seed(s)) == "" for s in range(400))
    assert 150 < empty < 250
    off = captions.CaptionOptions(keep_tokens=3)
    assert not off.varies and captions.process_caption(caption, off, torch.Generator()) == caption


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("field, value, message", [
    ("network", "lycoris", "Invalid network 'lycoris': use attention, kohya or locon."),
    ("optimizer", "sgd", "Invalid optimizer 'sgd': use adamw, adamw8bit or prodigy."),
    ("caption_dropout_rate", 1.0, "Invalid caption dropout rate 1: use a number at least 0 and below 1."),
    ("caption_tag_dropout_rate", -0.1, "Invalid caption tag dropout rate -0.1: use a number at least 0 and below 1."),
    ("conv_rank", 0, "Invalid conv rank 0: use a whole number from 1 to 1024."),
    ("save_every_epochs", 0, "Invalid save every epochs 0: use a whole number from 1 to 10000."),
    ("keep_tokens", 1.5, "Invalid keep tokens 1.5: use a whole number from 0 to 255."),
])
def test_bad_options_get_one_message_naming_them(field, value, message):
    with pytest.raises(StyleMixError) as e:
        TrainConfig(name="x", **{field: value}).validate()
    assert str(e.value) == message
    # the CLI refuses it in the same words
    import argparse

    from stylemix.training.config import add_config_arguments

    p = argparse.ArgumentParser()
    add_config_arguments(p)
    p.error = lambda msg: (_ for _ in ()).throw(StyleMixError(msg))
    with pytest.raises(StyleMixError, match=message.split(":")[0]):
        p.parse_args([f"--{field.replace('_', '-')}", str(value)])


def test_adamw8bit_without_cuda_and_keep_tokens_beyond_the_captions_fail_before_any_work(tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(StyleMixError, match="Invalid optimizer 'adamw8bit': bitsandbytes' 8-bit AdamW needs a CUDA"):
            TrainConfig(name="x", optimizer="adamw8bit").validate()
    make_dataset(tmp_path / "data")  # captions: "sksstyle, a striped picture number i" (2 tags)
    import trainers.lora

    monkeypatch.setattr(trainers.lora, "load_training_components", lambda *a: pytest.fail("model loaded"))
    with pytest.raises(StyleMixError, match=r"Invalid keep tokens 3: the caption of img0.png has only 2 .* use a "
                                            r"number from 0 to 2"):
        train(tiny_config(tmp_path, "kt", keep_tokens=3, shuffle_caption=True), tmp_path / "job")
    assert not (tmp_path / "loras").exists() and not (tmp_path / "job").exists()


# --------------------------------------------------------------------------- epoch versions


def test_epoch_saves_are_versions_that_load_mix_export_and_go_with_the_final_lora(tmp_path):
    make_dataset(tmp_path / "data")  # 4 images, batch 2: 2 steps an epoch
    cfg = tiny_config(tmp_path, "wc", max_steps=None, epochs=3, save_every_epochs=1, learning_rate=1e-2,
                      network="locon", train_text_encoder=False)
    train(cfg, tmp_path / "job")
    pipe = tiny_pipeline()
    lib = LoraLibrary(tmp_path / "loras", targets=pipeline_targets(pipe))
    assert lib.names() == ["wc", "wc@e01", "wc@e02"]  # the last epoch is the LoRA itself
    e1 = lib.get("wc@e01")
    assert e1.compatible and e1.trigger_word == "sksstyle" and e1.meta["epoch"] == 1 and e1.meta["step"] == 2
    assert e1.summary()["kind"] == "LoCon" and json.loads((lib.get("wc").folder / "stylemix.json").read_text())[
        "versions"] == ["wc@e01", "wc@e02"]
    # mixable (also by prompt tag) and exportable like any LoRA
    mixer = Mixer(LoadedModel(pipe, "tiny", torch.device("cpu"), torch.float32), lib)
    off = np.asarray(mixer.generate(RECIPE.with_(loras={"wc@e01": 0.0})).images[0], dtype=np.int16)
    tagged = RECIPE.with_(prompt="sksstyle, a house <lora:wc@e01:1>").validate()
    assert tagged.loras == {"wc@e01": 1.0}
    on = np.asarray(mixer.generate(tagged).images[0], dtype=np.int16)
    final = np.asarray(mixer.generate(RECIPE.with_(loras={"wc": 1.0})).images[0], dtype=np.int16)
    assert np.abs(on - off).max() > 0 and np.abs(on - final).max() > 0
    (tmp_path / "out").mkdir()
    out = lib.export("wc@e01", tmp_path / "out", fmt="kohya")
    assert out.name == "wc@e01.safetensors" and lib.import_file(out, "e1back").compatible
    # '@' is only for versions: never in a name a user picks
    with pytest.raises(StyleMixError):
        check_name("wc@e01", "LoRA name")
    for bad in ("wc@x", "wc@e1", "@e01", "a@b@e01"):
        with pytest.raises(StyleMixError):
            check_lora_name(bad)
    with pytest.raises(StyleMixError, match="epoch version of 'wc'"):
        lib.rename("wc@e01", "other")
    # renaming the LoRA takes its versions along; deleting it removes them
    lib.rename("wc", "ink")
    assert [n for n in lib.names() if n.startswith(("wc", "ink"))] == ["ink", "ink@e01", "ink@e02"]
    lib.remove("ink@e02")
    assert lib.versions("ink") == ["ink@e01"]
    lib.remove("ink")
    assert [n for n in lib.names() if n.startswith(("wc", "ink"))] == []
