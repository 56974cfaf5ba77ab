"""The web app's tabs: one module per tab (as A1111 keeps one modules/ui_<tab>.py per tab).

Each `build_*` lays out its tab and returns its handles; `app.build_demo` calls them in page
order and wires what crosses tabs explicitly.  Only app.py and ui/ import gradio.
"""
