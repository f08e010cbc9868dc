"""Routing: which export targets receive a result, decided by the series it was made from.

Each target may carry match rules (``match_calling_ae``, ``match_modality``,
``match_series_description``); a rule that is absent matches every series, and all the rules a
target gives must match. A target without rules receives every result, as before routing existed.

Two kinds of origin are routed by where the series came from:

- a ``kind = "sender"`` target (C-STORE back to the AE that sent the series) only ever receives
  results of series received by C-STORE from a calling AE; a pulled series has no sending AE;
- a series version pulled through an export target (``POST /jobs``, :mod:`ian_node.receive.pull`)
  always sends its result back to that target, whatever its rules say: whoever asked for the pull
  expects the result where the series is. Other targets receive it when their rules match.

The deliveries are decided once, when the worker hands over the result
(:meth:`ian_node.export.exporter.Exporter.submit`); a retry re-sends to the same targets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ian_node.config import TargetConfig
from ian_node.storage.records import Series


@dataclass(frozen=True)
class Route:
    """One target's match rules; an empty rule matches every series."""

    calling_aes: tuple[str, ...] = ()
    modalities: tuple[str, ...] = ()
    #: A regular expression searched, case-insensitively, in Series Description ("" matches all).
    series_description: str = ""
    #: Only series that a calling AE sent by C-STORE (the target sends back to that AE).
    needs_sender: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "calling_aes", tuple(a.strip() for a in self.calling_aes))
        object.__setattr__(self, "modalities", tuple(m.strip().upper() for m in self.modalities))
        re.compile(self.series_description)  # fails early, naming the pattern

    @classmethod
    def from_target(cls, config: TargetConfig) -> Route:
        """The rules of one configured export target."""
        return cls(calling_aes=tuple(config.match_calling_ae), modalities=tuple(config.match_modality),
                   series_description=config.match_series_description, needs_sender=config.kind == "sender")

    def matches(self, series: Series, pulled: bool = False) -> bool:
        """Whether a result of ``series`` (``pulled``: a version pulled by the API) goes to this target."""
        calling = "" if pulled else series.calling_ae.strip()
        if self.needs_sender and not calling:
            return False
        if self.calling_aes and calling not in self.calling_aes:
            return False
        if self.modalities and series.modality.strip().upper() not in self.modalities:
            return False
        return not self.series_description or re.search(
            self.series_description, series.description, re.IGNORECASE) is not None


def routes_for(configs: Iterable[TargetConfig]) -> dict[str, Route]:
    """Each configured target's route, by target name."""
    return {c.name: Route.from_target(c) for c in configs}


def routed_targets(targets: Iterable[str], routes: Mapping[str, Route], series: Series,
                   pulled_from: str | None = None) -> list[str]:
    """The targets a result of ``series`` goes to, in ``targets`` order.

    ``pulled_from``: the target the series version was pulled through, which always gets its result.
    A target without a route receives everything.
    """
    pulled = pulled_from is not None
    return [name for name in targets
            if name == pulled_from or routes.get(name, _EVERYTHING).matches(series, pulled=pulled)]


_EVERYTHING = Route()
