"""Per-user quotas: each limit refuses with a clear message before any work starts, and nothing is left."""

import dataclasses

import pytest

from helpers import make_library_lora, make_lora_file
from stylemix.quotas import QuotaError, Quotas
from stylemix.errors import StyleMixError
from stylemix.recipe import Recipe
from stylemix.service import StyleMixService, experiment_images, new_owner_token

ANN, BOB = new_owner_token(), new_owner_token()


@pytest.fixture
def service(workspace):
    make_library_lora(workspace.loras, "builtin", seed=1)
    make_library_lora(workspace.loras, "builtin2", seed=2)
    return StyleMixService.start("tiny", workspace, examples=False)


def with_quotas(service, **kw):
    service.quotas = dataclasses.replace(service.quotas, **kw)
    return service


def test_defaults_and_environment_variables():
    q = Quotas.from_env({})
    assert q == Quotas() and q.max_experiment_images >= 110  # the seed protocol fits
    q = Quotas.from_env({"STYLEMIX_MAX_LORAS": "3", "STYLEMIX_MAX_OUTPUTS": "7"})
    assert q.max_loras == 3 and q.max_outputs == 7 and q.max_lora_mb == Quotas().max_lora_mb
    with pytest.raises(StyleMixError, match=r"STYLEMIX_MAX_LORAS='many': expected a whole number"):
        Quotas.from_env({"STYLEMIX_MAX_LORAS": "many"})
    with pytest.raises(StyleMixError, match="must be 0 or more"):
        Quotas.from_env({"STYLEMIX_MAX_QUEUED_JOBS": "-1"})


def test_lora_count_and_bytes_per_user(service, tmp_path):
    with_quotas(service, max_loras=1)
    service.import_lora(ANN, str(make_lora_file(tmp_path / "a.safetensors", seed=3)), "first")
    with pytest.raises(QuotaError, match=r"You already own 1 LoRAs \(limit 1"):
        service.import_lora(ANN, str(make_lora_file(tmp_path / "b.safetensors", seed=4)), "second")
    assert not (service.workspace.loras / "second").exists()
    service.import_lora(BOB, str(tmp_path / "b.safetensors"), "second")  # a quota is per user
    with_quotas(service, max_loras=10, max_lora_mb=0)
    with pytest.raises(QuotaError, match=r"Your LoRAs would take .* MB \(limit 0 MB\)"):
        service.import_lora(ANN, str(tmp_path / "b.safetensors"), "third")
    assert not (service.workspace.loras / "third").exists()


def test_dataset_bytes_and_queued_jobs(service, tmp_path):
    with_quotas(service, max_dataset_mb=0)
    img = tmp_path / "x.png"
    img.write_bytes(b"\x89PNG" + b"0" * 5000)
    with pytest.raises(QuotaError, match=r"Your datasets would take .* \(limit 0 MB; this upload is"):
        service.prepare_dataset(ANN, [str(img)], "set", "zqx")
    assert not (service.workspace.data / ANN / "set").exists()
    data = service.user_dir(ANN, "data") / "set"
    data.mkdir()
    (data / "metadata.jsonl").write_text("")
    with_quotas(service, max_queued_jobs=0)
    with pytest.raises(QuotaError, match=r"0 training job\(s\) queued or running \(limit 0\)"):
        service.start_training(ANN, "set", "newlora", 2)
    assert not list(service.workspace.jobs.iterdir())


def test_images_per_experiment_run(service):
    assert experiment_images("protocol", 2, 1, 1) == 4  # base, 2 singles, one 50/50 mix
    assert experiment_images("protocol", 4, 5, 2) == 110  # the seed protocol
    assert experiment_images("sweep", 2, 1, 1, [0, 1]) == 5
    with_quotas(service, max_experiment_images=3)
    with pytest.raises(QuotaError, match=r"would make 4 images \(limit 3 per run\)"):
        service.run_experiment(ANN, "protocol", ["builtin", "builtin2"], ["a cat"], [0], 1, 64)
    assert not (service.workspace.outputs / ANN / "experiments").exists()


def test_outputs_kept_per_user_oldest_first(service):
    import os

    with_quotas(service, max_outputs=2)
    recipe = Recipe("a cat", steps=1, width=64, height=64)
    made = []
    for i in range(3):
        out = service.compose(ANN, recipe.with_(seed=i), score=False)
        os.utime(out.image_paths[0], (1000 + i, 1000 + i))  # distinct ages, oldest first
        os.utime(out.recipe_path, (1000 + i, 1000 + i))
        made.append(out)
    service.trim_outputs(ANN)
    kept = sorted(p.name for p in (service.workspace.outputs / ANN).iterdir())
    assert not made[0].image_paths[0].exists() and not made[0].recipe_path.exists()
    assert all(p.exists() for m in made[1:] for p in (m.image_paths[0], m.recipe_path)) and len(kept) == 4
