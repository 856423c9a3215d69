"""Sizes as people read them (for reports, summaries and the command line); no heavy imports."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


_COUNT_UNITS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}


def parse_count(value: str) -> int | None:
    """mergekit's parameter counts: '5B' (billions), '500M', '10K' or a plain number; None when not one."""
    text = str(value).strip().upper()
    unit = text[-1:] if text[-1:] in ("K", "M", "B") else ""
    number = text[: len(text) - len(unit)]
    try:
        count = float(number) * _COUNT_UNITS[unit]
    except ValueError:
        return None
    return int(count) if count >= 1 and count == count and count != float("inf") else None
