"""Text → audio for a Piper/VITS bundle in one pool: the front end and the graph in one actor."""
from __future__ import annotations

from actors.rows import Batch, RowStatus
from actors.stage import Stage
from actors.vits.frontend import FrontendOptions, VitsFrontend
from actors.vits.synth import SynthOptions, VitsSynth


class VitsOptions(FrontendOptions, SynthOptions):
    """The front end's and the synthesis stage's options together."""


class VitsStage(Stage):
    """`VitsFrontend` then `VitsSynth` in one process: no intermediate columns leave the actor.

    On CPU the graph dominates (99% of the time), so one pool that does both is
    the default; the two-pool form exists for front ends that need their own scaling.
    """

    name = "vits"
    family = "vits"
    Options = VitsOptions
    requires = VitsFrontend.requires
    provides = VitsSynth.provides

    def __init__(self, bundle, *, sessions=None, backend=None, **kwargs) -> None:
        super().__init__(bundle, backend=backend, **kwargs)
        options = self.options.model_dump()
        self.frontend = VitsFrontend(bundle, options={k: options[k] for k in FrontendOptions.model_fields})
        self.synth = VitsSynth(bundle, options={k: options[k] for k in SynthOptions.model_fields},
                               backend=self.backend, sessions=sessions, name=self.name)
        self.sample_rate = self.synth.sample_rate

    def process(self, batch: Batch, rows: RowStatus) -> Batch:
        return self.synth.process({**batch, **self.frontend.process(batch, rows)}, rows)
