"""Protective stop orders at the broker for the legs of crashed strategies (``[protect]``).

See docs/PROTECT.md: what is sent to the broker, when, and how to turn it off.
"""

__all__: list[str] = []
