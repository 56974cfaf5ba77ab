"""Clash map: per-layer cosine of two LoRAs' weight updates, against the dense computation."""

import math

import pytest
import torch

from helpers import make_library_lora
from stylemix.lora import files as lora_files
from stylemix.experiments.clash import clash_map, clash_states, delta_inner, draw_heatmap
from stylemix.errors import StyleMixError
from stylemix.lora.library import LoraLibrary


def test_inner_product_identity_matches_dense():
    g = torch.Generator().manual_seed(0)
    a1, b1 = torch.randn(3, 40, generator=g), torch.randn(50, 3, generator=g)
    a2, b2 = torch.randn(5, 40, generator=g), torch.randn(50, 5, generator=g)
    dense = float(((b1 @ a1).double() * (b2 @ a2).double()).sum())
    assert delta_inner(a1, b1, a2, b2) == pytest.approx(dense, rel=1e-5)


def test_clash_of_known_updates():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 16, generator=g), torch.randn(24, 2, generator=g)
    c, e = torch.randn(2, 16, generator=g), torch.randn(24, 2, generator=g)
    mod_up = "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    mod_down = "unet.down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k"
    mod_te = "text_encoder.text_model.encoder.layers.3.self_attn.v_proj"

    def st(pairs):
        return {f"{m}.lora_{x}.weight": t for m, (A, B) in pairs.items() for x, t in (("A", A), ("B", B))}

    s1 = st({mod_up: (a, b), mod_down: (a, b), mod_te: (c, e)})
    # same update scaled (cos +1), negated (cos -1), and an unrelated one
    s2 = st({mod_up: (a, 3 * b), mod_down: (a, -b), mod_te: (a[:, :16], torch.randn(24, 2, generator=g))})
    m = clash_states(s1, {}, s2, {}, "x", "y")
    by = {layer.module: layer for layer in m.layers}
    assert by[mod_up].cosine == pytest.approx(1.0) and by[mod_up].block == "up.1"
    assert by[mod_down].cosine == pytest.approx(-1.0) and by[mod_down].block == "down.2"
    assert by[mod_te].block == "text_encoder" and abs(by[mod_te].cosine) < 1
    assert m.blocks["up.1"] == pytest.approx(1.0) and m.blocks["down.2"] == pytest.approx(-1.0)
    assert m.worst_blocks(1) == [("down.2", pytest.approx(-1.0))]
    # a negative mix weight flips the sign
    flipped = clash_states(s1, {}, s2, {}, "x", "y", weight_b=-0.5)
    assert flipped.blocks["up.1"] == pytest.approx(-1.0)
    # the whole update's cosine: inner products over norms of the concatenated updates
    ip = sum(layer.inner for layer in m.layers)
    na = math.sqrt(sum(layer.norm_a**2 for layer in m.layers))
    nb = math.sqrt(sum(layer.norm_b**2 for layer in m.layers))
    assert m.overall == pytest.approx(ip / (na * nb))


def test_clash_map_of_library_loras_and_heatmap(workspace, tmp_path):
    make_library_lora(workspace.loras, "a", seed=1)
    make_library_lora(workspace.loras, "b", seed=2, rank=2)
    lib = LoraLibrary(workspace.loras)
    m = clash_map(lib, "a", "b")
    n_layers = len(lora_files.lora_modules(lora_files.read_lora_file(lib.get("a").weights)[0]))
    assert len(m.layers) == n_layers and m.only_a == m.only_b == 0
    assert set(m.blocks) >= {"text_encoder", "down.0", "mid", "up.3"}
    assert all(c is None or -1 <= c <= 1 for c in m.blocks.values())
    # dense check on one layer, with each LoRA's alpha/rank scale
    layer = m.layers[5]
    (a1, b1), (a2, b2) = (lora_files.lora_modules(lora_files.read_lora_file(lib.get(n).weights)[0])[layer.module]
                          for n in ("a", "b"))
    d1, d2 = (b1 @ a1).double(), (b2 @ a2).double()
    assert layer.cosine == pytest.approx(float((d1 * d2).sum() / (d1.norm() * d2.norm())), rel=1e-5)
    img = draw_heatmap(m, tmp_path / "clash.png")
    assert (tmp_path / "clash.png").is_file() and img.width > 100
    assert len(set(img.getdata())) > 5  # actually coloured
    with pytest.raises(StyleMixError, match="twice"):
        clash_map(lib, "a", "a")
    with pytest.raises(StyleMixError, match="ghost"):
        clash_map(lib, "a", "ghost")
