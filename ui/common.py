"""What every tab shares: the user's identity, readable errors, the GPU decorator and the queues."""

from __future__ import annotations

import functools
import hashlib
import html
import logging
import os

import gradio as gr

from stylemix.errors import StyleMixError
from stylemix.paths import check_name
from stylemix.service import check_owner_token, zero_gpu

logger = logging.getLogger("stylemix.app")

GPU_QUEUE = "gpu"  # every event that runs the model shares this queue: one at a time
GPU = dict(concurrency_id=GPU_QUEUE, concurrency_limit=1)
# Previews: their own queue, a few at once (one per session at most, by always_last): the pipeline's
# lock and stylemix.preview decide who renders; newer requests interrupt older ones between steps.
PREVIEW = dict(concurrency_id="preview", concurrency_limit=4)
EXPERIMENTS = dict(concurrency_id="experiments", concurrency_limit=2)  # interleaved with compose per image

try:  # Hugging Face ZeroGPU: a GPU is lent per decorated call; elsewhere the decorator is not used
    import spaces  # type: ignore
except ImportError:
    spaces = None


def gpu(duration: int):
    """spaces.GPU(duration) on a ZeroGPU Space, a no-op everywhere else."""
    if spaces is not None and zero_gpu():
        return spaces.GPU(duration=duration)
    return lambda fn: fn


def user_error(message: str, title: str = "Error") -> gr.Error:
    """The one way a message reaches the page as an error toast: escaped (Gradio renders toasts as
    HTML, so `<lora:x:5>` or a path in `<...>` would vanish), and without a traceback in the server
    log (a user's mistake is one log line, written by `readable_errors`)."""
    return gr.Error(html.escape(str(message), quote=False), title=title, print_exception=False)


def escape_md(text: str) -> str:
    """User text (LoRA names, messages, tags) shown inside Markdown/HTML output as plain text."""
    return html.escape(str(text), quote=False)


def badge_sink() -> gr.HTML:
    """An invisible component for `show_progress_on=[...]`: Gradio draws an event's progress and its red
    "Error" badge on every output (show_progress="hidden" does not stop the badge), over the very fields
    the user must fix.  Named in show_progress_on, this one takes them out of sight; the error itself
    still shows once, as the toast.  (Events that want a visible progress bar name a display-only output
    such as the image instead.)"""
    return gr.HTML("", visible=False, elem_classes=["sm-badge-sink"])


def readable_errors(fn):
    """Every failure reaches the page as one readable, escaped message, never a traceback.

    A user's mistake (StyleMixError, ValueError) is one INFO log line; an unexpected error keeps its
    full traceback in the log for the operator and shows the user one line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error as e:
            if getattr(e, "print_exception", True):  # raised by gradio or old code: no traceback either
                e.print_exception = False
            logger.info("%s refused: %s", fn.__name__, e.message)
            raise
        except (StyleMixError, ValueError) as e:
            logger.info("%s refused: %s", fn.__name__, e)
            raise user_error(str(e)) from None
        except Exception as e:  # noqa: BLE001  (logged in full for the operator, one line for the user)
            logger.exception("Unexpected error in %s", fn.__name__)
            raise user_error(f"Something went wrong ({type(e).__name__}: {str(e)[:300]}); the server log has "
                             "the details.") from None

    return wrapper


def owner_of(token: str | None, request: gr.Request | None) -> str:
    """The user's owner id: the login name when auth is on (STYLEMIX_AUTH, or a Hugging Face login on a
    Space with `hf_oauth: true`), else the browser's token."""
    name = (getattr(request, "username", None) or _space_login(request)) if request is not None else None
    if name:
        safe = "".join(c for c in name if c.isalnum())[:40]
        if safe != name:  # 'a.b' and 'ab' must not share a folder: other characters add a hash of the name
            safe = f"{safe[:30]}_{hashlib.sha256(name.encode()).hexdigest()[:8]}"
        return check_name("user_" + safe, "user")
    if not token:
        raise user_error("Your session has no id yet; reload the page.")
    return check_owner_token(token)


def _space_login(request: gr.Request) -> str | None:
    """The Hugging Face user logged in with the page's Login button (OAuth session), if any."""
    try:
        info = request.session.get("oauth_info") or {}  # only present when the Space enables OAuth
    except (AssertionError, AttributeError, KeyError):  # no session middleware: OAuth is off
        return None
    name = (info.get("userinfo") or {}).get("preferred_username")
    return name if isinstance(name, str) and name else None


def auth_on() -> bool:
    """App auth is on (STYLEMIX_AUTH, or a Space that asks visitors to log in)."""
    return bool(os.environ.get("STYLEMIX_AUTH") or os.environ.get("OAUTH_CLIENT_ID"))
