"""The app through a real client: launched on the tiny model, driven by its named API endpoints."""

import json

import numpy as np
import pytest
from PIL import Image

from helpers import make_library_lora
from stylemix.paths import Workspace
from stylemix.recipe import read_recipe

gradio_client = pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    import app
    from stylemix.service import StyleMixService

    from stylemix.clip_models import tiny_scorer
    from stylemix.scoring import compute_centroid, save_centroid

    from stylemix.recipe import Recipe

    ws = Workspace.at(tmp_path_factory.mktemp("ws"))
    for i, name in enumerate(["anime", "watercolor", "cartoon", "pixelart"]):
        make_library_lora(ws.loras, name, seed=20 + i)
    service = StyleMixService.start("tiny", ws)
    scorer = tiny_scorer()
    for name in ("watercolor", "pixelart"):  # each style's own images give it a centroid
        refs = [service.mixer.generate(Recipe("a cat", loras={name: 1.0}, seed=s, steps=2, width=64, height=64,
                                              sampler="Euler")).images[0] for s in range(4)]
        save_centroid(ws.loras / name, compute_centroid(scorer, refs))
    demo = app.build_demo(service)
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True,
                        allowed_paths=[str(ws.outputs)])
    yield demo.local_url, ws, service
    demo.close()


def compose(client, weights, seed=3, owner="u" + "1" * 24):
    return client.predict("a cat", "", json.dumps(weights), seed, True, 2, "64x64", "Euler", 7.5, 0, True, owner,
                          api_name="/compose")


def test_compose_endpoint_weights_change_the_image(app_url):
    url, ws, service = app_url
    client = gradio_client.Client(url, verbose=False)
    assert "tiny" in service.banner.lower() and "random weights" in service.banner
    a = compose(client, {"watercolor": 0.6, "pixelart": 0.4})
    b = compose(client, {"watercolor": 0.5, "pixelart": 0.5})
    zero = compose(client, {"watercolor": 0.0, "pixelart": 0.0})
    base = compose(client, {})
    img = lambda r: np.asarray(Image.open(r[0]), dtype=np.int16)  # noqa: E731
    assert np.abs(img(a) - img(b)).max() > 0
    assert np.array_equal(img(zero), img(base))
    recipe = read_recipe(a[4])  # the downloadable PNG carries its recipe
    assert recipe.loras == {"watercolor": 0.6, "pixelart": 0.4} and recipe.seed == 3
    assert "watercolorstyle" in a[6]
    # scores: demo values from the tiny CLIP, calibrated against the base image, shares summing to 1
    assert "CLIP score" in a[1] and "Demo values" in a[1] and "calibrated" in a[1]
    shares = {c["label"]: c["confidence"] for c in a[2]["confidences"]}
    assert set(shares) == {"watercolor", "pixelart"} and abs(sum(shares.values()) - 1) < 1e-6
    assert a[1] != b[1]  # other weights, other scores
    # the user's files are filed under their own folder
    assert list((ws.outputs / ("u" + "1" * 24)).glob("*.png"))


def test_compose_errors_are_readable(app_url):
    url, _, _ = app_url
    client = gradio_client.Client(url, verbose=False)
    with pytest.raises(Exception, match=r"\[-2, 2\]"):
        compose(client, {"watercolor": 5})
    with pytest.raises(Exception, match="No LoRA named"):
        compose(client, {"nope": 1})
    with pytest.raises(Exception, match="Invalid session id"):
        compose(client, {}, owner="../../etc")
