"""Retrieval: find passages of the user's documents for a question, and give them to the model.

A retriever is anything with `search(query, k) -> list[Passage]` (`Retriever`). The built-in one
is the BM25 index of `kimbho index build` (`index.Index`); packages add others under the
entry-point group `kimbho.retrievers`, each a callable that takes the `--index` argument (a path,
or None) and returns a retriever:

    [project.entry-points."kimbho.retrievers"]
    mine = "my_package:make_retriever"

`--retriever NAME` picks one (default `bm25`). `augment` builds the prompts from what was found,
the same way for `generate`, `serve` and `finetune --index`.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable

from ..errors import KimbhoError
from .index import Passage

ENTRY_POINT_GROUP = "kimbho.retrievers"
DEFAULT_RETRIEVER = "bm25"
DEFAULT_K = 4


@runtime_checkable
class Retriever(Protocol):
    def search(self, query: str, k: int) -> list[Passage]: ...


def available_retrievers() -> list[str]:
    return sorted({DEFAULT_RETRIEVER, *(e.name for e in entry_points(group=ENTRY_POINT_GROUP))})


def open_retriever(index: str | None, name: str = DEFAULT_RETRIEVER) -> Retriever:
    """The retriever `name` over `index`: the built-in BM25 index, or a plugin's."""
    if name == DEFAULT_RETRIEVER:
        from .index import Index

        if index is None:
            raise KimbhoError("the bm25 retriever needs --index INDEX_DIR (made by `kimbho index build`)")
        return Index(index)
    found = [e for e in entry_points(group=ENTRY_POINT_GROUP) if e.name == name]
    if not found:
        raise KimbhoError(f"no retriever named {name!r}; installed: {', '.join(available_retrievers())}")
    try:
        retriever = found[0].load()(index)
    except KimbhoError:
        raise
    except Exception as e:  # a plugin's failure is reported as its own, in one line
        raise KimbhoError(
            f"retriever {name!r} ({found[0].value}) failed to start: {type(e).__name__}: {e}"
        ) from None
    if not isinstance(retriever, Retriever):
        raise KimbhoError(
            f"retriever {name!r} ({found[0].value}) returned an object without search(query, k)"
        )
    return retriever


__all__ = ["DEFAULT_K", "Passage", "Retriever", "available_retrievers", "open_retriever"]
