"""The top of the page: what StyleMix is, where to start, and the model's state in one line (details folded)."""

from __future__ import annotations

import gradio as gr

from stylemix.service import StyleMixService


def start_here(examples: list[str]) -> str:
    """Where a newcomer starts: mixing the example LoRAs when there are some, else making or importing one."""
    if examples:
        names = " and ".join(f"`{n}`" for n in examples)
        return (f"**Start here:** open **Compose** and drag the sliders of the example LoRAs {names}. "
                "To make your own style: **Dataset** (upload 10-30 images) → **Train**.")
    return ("**Start here:** upload 10-30 images of one style in **Dataset**, then **Train**; or import LoRAs you "
            "already have in **Library**. Then mix them in **Compose**, one slider per style.")


def build_home(service: StyleMixService) -> None:
    """Lay out the page's header (above the tabs)."""
    gr.Markdown("# StyleMix\nTrain a style LoRA for Stable Diffusion 1.5 from a few images, then mix styles "
                "with one slider each: every image comes back with a CLIP score and how much of each style is in it.")
    gr.Markdown(start_here(service.example_loras()), elem_id="start-here")
    gr.Markdown(service.model_line, elem_id="banner")
    if service.banner_details:
        with gr.Accordion("About the model", open=False, elem_id="banner-details"):
            gr.Markdown("\n".join(f"- {d}" for d in service.banner_details))
