"""C++ CPU kernel (placeholder until csrc lands)."""
DTYPES = ()


def is_available() -> bool:
    return False
