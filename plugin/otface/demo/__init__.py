"""The embedded demo data: procedurally rendered synthetic faces, generated once into a cache.

A stand-in for real face data, so that training, verification and IJB evaluation run end to
end on a CPU. The renderer (:mod:`~otface.demo.identity`, :mod:`~otface.demo.parts`,
:mod:`~otface.demo.render`, :mod:`~otface.demo.photos`) draws the faces; the writers
(:mod:`~otface.demo.pairs`, :mod:`~otface.demo.ijb`, :mod:`~otface.demo.generate`) lay them
out as a training ``.rec``, ``.bin`` pair sets and an IJB-format benchmark. Data access lives in
:mod:`otface.data`, which only calls :func:`ensure_demo` for ``rec = "demo"``.
"""

from otface.demo.generate import FORMAT_VERSION, default_cache_root, ensure_demo, generate_demo

__all__ = ["FORMAT_VERSION", "default_cache_root", "ensure_demo", "generate_demo"]
