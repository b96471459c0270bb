"""One escaping layer per output format: HTML, Markdown and the terminal.

Everything that reaches a report or a terminal may come from a device, a model
file or a report file someone else wrote, so renderers escape by default:

* ``Html`` marks markup that edgeq itself built; ``html()`` escapes anything
  else, whatever its type (a "number" in a crafted report.json can be a string
  holding ``<script>``), drops control characters (ESC, BEL; not tab or
  newline), and ``html_join``/``tag`` compose safely.
* ``md()`` makes a value inert inside Markdown text and table cells.
* ``term()`` removes terminal control sequences (ESC, other C0/C1 controls);
  ``one_line()`` also folds newlines and bounds the length.
"""

from __future__ import annotations

import html as _html
import re
from typing import Any, Iterable

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROL_NL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~])")


class Html(str):
    """Markup edgeq built itself; ``html()`` passes it through unchanged."""

    __slots__ = ()


def html(value: Any) -> Html:
    """``value`` as HTML text: markup built by edgeq passes, everything else is escaped."""
    if isinstance(value, Html):
        return value
    # Control characters (ESC, BEL, C1...) are dropped: a page saved and later shown with `cat`
    # or pasted into a terminal must not carry a device's escape sequences. Tabs and newlines stay.
    return Html(_html.escape(_CONTROL.sub("", "" if value is None else str(value)), quote=True))


def html_join(parts: Iterable[Any], sep: str = "") -> Html:
    """Join parts, escaping every part that is not already ``Html``."""
    return Html(sep.join(html(p) for p in parts))


def tag(name: str, *children: Any, **attrs: Any) -> Html:
    """``<name attr="...">children</name>`` with every attribute value and child escaped."""
    if not re.fullmatch(r"[a-z][a-z0-9]*", name):
        raise ValueError(f"bad tag name {name!r}")
    attr = "".join(f' {k.rstrip("_").replace("_", "-")}="{html(v)}"' for k, v in attrs.items() if v is not None)
    return Html(f"<{name}{attr}>{html_join(children)}</{name}>")


def md(value: Any, limit: int = 500) -> str:
    """``value`` as inert Markdown text (one line, specials backslash-escaped, HTML escaped)."""
    text = one_line(value, limit)
    return _html.escape(_MD_SPECIAL.sub(r"\\\1", text), quote=False)


def term(value: Any, keep_newlines: bool = True) -> str:
    """``value`` with terminal control characters replaced, so device text cannot drive the terminal."""
    text = "" if value is None else str(value)
    pattern = _CONTROL if keep_newlines else _CONTROL_NL
    return pattern.sub(lambda m: "\\x%02x" % ord(m.group()), text)


def one_line(value: Any, limit: int = 300) -> str:
    """``value`` on one line, control characters escaped, at most ``limit`` characters (with an ellipsis)."""
    text = "" if value is None else str(value)
    text = " ".join(text.replace("\r", "\n").split("\n"))
    text = term(text, keep_newlines=False)
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"
