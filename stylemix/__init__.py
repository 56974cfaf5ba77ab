"""StyleMix: train style LoRAs for Stable Diffusion 1.5 and mix them with one weight per style.

The library never imports gradio; `app.py` is the web UI on top of it and `stylemix.cli`
the command line.
"""

__version__ = "0.1.0"
