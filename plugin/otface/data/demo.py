"""Former home of the demo data generator, now :mod:`otface.demo`; kept for old imports."""

from otface.demo.generate import FORMAT_VERSION, default_cache_root, ensure_demo, generate_demo

__all__ = ["FORMAT_VERSION", "default_cache_root", "ensure_demo", "generate_demo"]
