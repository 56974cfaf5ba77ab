"""StyleMix web app: Gradio Blocks laid out here, every action a call into `stylemix.service`.

Run `python app.py` (or `stylemix serve`).  No module-level mutable state: the service (one
shared pipeline, one GPU queue) is created in `main()` and passed to `build_demo`; each browser
gets its own owner token, kept in the browser, under which its files are filed.
"""

from __future__ import annotations

import json
import logging
import os
import random

import gradio as gr

from stylemix.errors import StyleMixError
from stylemix.paths import Workspace, check_name
from stylemix.recipe import DEFAULT_SAMPLER, SAMPLERS, Recipe, read_recipe
from stylemix.service import StyleMixService, new_owner_token

SIZES = ["512x512", "512x768", "768x512", "640x640", "256x256", "128x128", "64x64"]
GPU_QUEUE = "gpu"  # every event that runs the model shares this queue: one at a time


def _owner(token: str | None, request: gr.Request | None) -> str:
    """The user's owner id: the login name when auth is on, else the browser's token."""
    if request is not None and getattr(request, "username", None):
        return check_name("user_" + "".join(c for c in request.username if c.isalnum())[:40], "user")
    if not token:
        raise gr.Error("Your session has no id yet; reload the page.")
    return check_name(token, "session id")


def _format_scores(scores: dict | None) -> tuple[str, dict | None]:
    if not scores:
        return "", None
    if scores.get("unavailable"):
        return f"Scores unavailable: {scores['unavailable']}", None
    s = scores["images"][0]
    if s.get("clip_score") is None:
        lines = [f"**CLIP score** n/a (the prompt is only trigger words) with `{s['clip_model']}`"]
    else:
        lines = [f"**CLIP score** {s['clip_score']:.4f} (×100 scale: {s['clip_score_100']:.1f}) "
                 f"with `{s['clip_model']}`"]
    for name, sim in (s.get("similarity") or {}).items():
        cal = (s.get("calibrated") or {}).get(name)
        lines.append(f"- **{name}** similarity {sim:.4f}" + (f", calibrated {cal:.2f}" if cal is not None else ""))
    if s.get("shares") and s.get("shares_basis") != "calibrated":
        lines.append("*Shares are uncalibrated (raw similarities): no base-model anchor for every style.*")
    if scores.get("missing_centroids"):
        lines.append(f"No style centroid yet for: {', '.join(scores['missing_centroids'])} "
                     "(train here or give reference images in the Library tab).")
    if s.get("is_demo"):
        lines.append("*Demo values: computed with a tiny random CLIP, not a real measurement.*")
    return "\n".join(lines), (s.get("shares") or None)


def build_demo(service: StyleMixService) -> gr.Blocks:
    with gr.Blocks(title="StyleMix") as demo:
        owner = gr.BrowserState(None, storage_key="stylemix_owner")
        lora_names = gr.State([e["name"] for e in service.usable_loras()])
        gr.Markdown("# StyleMix\nTrain style LoRAs for Stable Diffusion 1.5 and mix them, one slider per style.")
        gr.Markdown(service.banner, elem_id="banner")

        with gr.Tab("Compose", id="compose"):
            with gr.Row():
                with gr.Column(scale=1):
                    prompt = gr.Textbox(label="Prompt", value="a cat sitting by a window", lines=2)
                    negative = gr.Textbox(label="Negative prompt", value="")
                    weights_box = gr.Textbox(label="Weights (JSON)", value="{}", visible=False)

                    @gr.render(inputs=lora_names)
                    def render_sliders(names):
                        if not names:
                            gr.Markdown("No LoRAs in the library yet: train one or import one.")
                            return
                        sliders = [gr.Slider(-2, 2, value=0, step=0.05, label=n, key=f"w-{n}") for n in names]

                        def collect(*values):
                            return json.dumps(dict(zip(names, values)))

                        for s in sliders:
                            s.release(collect, inputs=sliders, outputs=weights_box, queue=False).then(
                                compose_fn, inputs=compose_inputs, outputs=compose_outputs,
                                concurrency_id=GPU_QUEUE, concurrency_limit=1, trigger_mode="always_last")

                    with gr.Row():
                        seed = gr.Number(label="Seed", value=1, precision=0)
                        lock = gr.Checkbox(label="Lock seed", value=True)
                    with gr.Accordion("Settings", open=False):
                        steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
                        size = gr.Dropdown(SIZES, value="512x512", label="Size", allow_custom_value=True)
                        sampler = gr.Dropdown(list(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler")
                        guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="CFG scale")
                        strength = gr.Number(label="Keep total strength at (0 = off)", value=0)
                        triggers = gr.Checkbox(label="Put trigger words in front of the prompt", value=True)
                    go = gr.Button("Generate", variant="primary")
                with gr.Column(scale=1):
                    image = gr.Image(label="Image", type="filepath", format="png", interactive=False)
                    shares = gr.Label(label="Style shares")
                    scores_md = gr.Markdown()
                    used = gr.Markdown()
                    with gr.Row():
                        png_file = gr.File(label="PNG with recipe")
                        recipe_file = gr.File(label="Recipe JSON")
                    recipe_in = gr.File(label="Load a recipe: drop a StyleMix PNG or recipe JSON",
                                        file_types=[".png", ".json"], type="filepath")

        compose_inputs = [prompt, negative, weights_box, seed, lock, steps, size, sampler, guidance, strength,
                          triggers, owner]
        compose_outputs = [image, scores_md, shares, seed, png_file, recipe_file, used]

        def compose_fn(prompt_, negative_, weights_json, seed_, lock_, steps_, size_, sampler_, guidance_,
                       strength_, triggers_, owner_, request: gr.Request, progress=gr.Progress()):
            try:
                who = _owner(owner_, request)
                weights = json.loads(weights_json or "{}")
                if not isinstance(weights, dict):
                    raise ValueError("weights must be a JSON object of LoRA name -> weight")
                w, h = (int(x) for x in str(size_).lower().split("x"))
                seed_value = int(seed_) if lock_ and seed_ is not None else random.randrange(2**32)
                recipe = Recipe(prompt=prompt_, negative_prompt=negative_ or "", loras=weights, seed=seed_value,
                                steps=int(steps_), width=w, height=h, sampler=sampler_, guidance=float(guidance_),
                                total_strength=float(strength_) if strength_ else None,
                                add_trigger_words=bool(triggers_)).validate()
                out = service.compose(who, recipe, progress=lambda d, t: progress((d, t), desc="denoising"))
            except (StyleMixError, ValueError) as e:
                raise gr.Error(str(e)) from None
            md, share = _format_scores(out.scores)
            used_md = f"Prompt used: `{out.result.prompt_used}`  \nWeights used: " + (
                ", ".join(f"{n} {v:.3g}" for n, v in out.result.weights_used.items() if v) or "none (base model)")
            path = str(out.image_paths[0])
            return path, md, share, seed_value, path, str(out.recipe_path), used_md

        go.click(compose_fn, inputs=compose_inputs, outputs=compose_outputs, api_name="compose",
                 concurrency_id=GPU_QUEUE, concurrency_limit=1, trigger_mode="always_last")

        def load_recipe(path, names):
            try:
                if not path:
                    return [gr.update()] * 10
                if str(path).lower().endswith(".json"):
                    with open(path, encoding="utf-8") as f:
                        r = Recipe.from_dict(json.loads(f.read(200_000)))
                else:
                    r = read_recipe(path)
            except (StyleMixError, ValueError, OSError) as e:
                raise gr.Error(f"Could not read that recipe: {e}") from None
            missing = [n for n in r.loras if n not in names]
            if missing:
                gr.Warning(f"Not in your library: {', '.join(missing)} (their weights are ignored).")
            weights = {n: w for n, w in r.loras.items() if n in names}
            return (r.prompt, r.negative_prompt, json.dumps(weights), r.seed, True, r.steps,
                    f"{r.width}x{r.height}", r.sampler, r.guidance, names)

        recipe_in.upload(load_recipe, inputs=[recipe_in, lora_names],
                         outputs=[prompt, negative, weights_box, seed, lock, steps, size, sampler, guidance, lora_names],
                         api_name="load_recipe")

        def ensure_owner(token):
            try:
                return check_name(token, "session id") if token else new_owner_token()
            except StyleMixError:
                return new_owner_token()

        demo.load(ensure_owner, inputs=owner, outputs=owner, api_name=False)
    return demo


def main(model: str | None = None, device: str | None = None, dtype: str | None = None,
         loras_dir: str | None = None, host: str | None = None, port: int | None = None,
         share: bool = False, auth: str | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="stylemix: %(message)s")
    service = StyleMixService.start(model, Workspace.default(loras_dir), device=device, dtype=dtype)
    demo = build_demo(service)
    auth = auth or os.environ.get("STYLEMIX_AUTH")
    auth_pair = tuple(auth.split(":", 1)) if auth and ":" in auth else None
    demo.queue(default_concurrency_limit=1).launch(
        server_name=host or os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        server_port=port or int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
        share=share, auth=auth_pair, max_file_size="200mb",
        allowed_paths=[str(service.workspace.outputs)])


if __name__ == "__main__":
    main()
