"""Fully dynamic submodular selection of a diverse replay subset over faiss embeddings.

    from sponge.selectors import DynamicSelector, FacilityLocation
    sel = DynamicSelector(FacilityLocation(reference_vectors, m=16), k=64, eps=0.2, seed=0)
    sel.insert(ids, vectors, quality=None); sel.delete(ids)
    sel.solution(); sel.value(); sel.stats()

Modules: objectives (f in weighted-coverage form + counting oracle), base (Selector interface,
parameter persistence), dynamic (the (1/2 - eps) dynamic algorithm), baselines (lazy greedy rerun,
sieve-streaming rerun, random subset).
"""

from sponge.selectors.base import Selector, load_params, params_bytes, save_params, selector_from_bytes
from sponge.selectors.baselines import (
    LazyGreedyRerun,
    RandomSubset,
    SieveStreamingRerun,
    lazy_greedy,
)
from sponge.selectors.dynamic import DynamicSelector
from sponge.selectors.objectives import FacilityLocation, Objective, SetCoverage

METHODS: dict[str, type[Selector]] = {
    cls.method: cls for cls in (DynamicSelector, LazyGreedyRerun, SieveStreamingRerun, RandomSubset)
}

__all__ = [
    "METHODS",
    "DynamicSelector",
    "FacilityLocation",
    "LazyGreedyRerun",
    "Objective",
    "RandomSubset",
    "Selector",
    "SetCoverage",
    "SieveStreamingRerun",
    "lazy_greedy",
    "load_params",
    "params_bytes",
    "save_params",
    "selector_from_bytes",
]
