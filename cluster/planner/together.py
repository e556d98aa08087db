"""Several models on one cluster: the devices each takes and whether they fit together.

The rule `up` follows when it serves several models behind one endpoint (``--model A --model
B,tp=2,replicas=2``): each further model takes tp x pp x replicas devices (one replica unless
asked); the first model's replicas are as given, or with ``--replicas auto`` what its own count
would be, lowered to what the devices left beside the further models hold (at least 1). The
models fit when their devices add up to no more than the cluster's. `llamacluster plan` and
`up`'s serve stage both call share_devices, so the two agree.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, Field, computed_field

from cluster.errors import ConfigError
from cluster.planner.replicas import ReplicaChoice

FIT_HINT = (
    "lower --replicas or --tp/--pp (a further model's tp=, pp=, replicas=), serve fewer "
    "models, or add nodes"
)
"""What to change when the models do not fit together."""


def layout_text(tp: int, pp: int, replicas: int) -> str:
    """``tp=2 × pp=1``, or ``3 replicas of tp=2 × pp=1``."""
    layout = f"tp={tp} × pp={pp}"
    return layout if replicas <= 1 else f"{replicas} replicas of {layout}"


class ModelLayout(BaseModel):
    """One further model's layout as asked or planned, before the devices are shared."""

    name: str = Field(description="The model's name (its served name, else its path or repo).")
    tp: int = Field(ge=1, description="Tensor-parallel size (as asked, else the planner's).")
    pp: int = Field(ge=1, description="Pipeline-parallel size (as asked, else the planner's).")
    replicas: int | None = Field(
        default=None, ge=1, description="Replicas as asked (replicas=N); None: one."
    )


class ModelDevices(BaseModel):
    """One model's share of the cluster: its layout, replicas and devices."""

    name: str = Field(description="The model's name (its served name, else its path or repo).")
    tp: int = Field(ge=1, description="Tensor-parallel size of each replica.")
    pp: int = Field(ge=1, description="Pipeline-parallel size of each replica.")
    replicas: int = Field(ge=1, description="Engines (tp x pp groups) of this model.")
    auto: bool = Field(
        description="Replicas chosen from the devices left (the first model's --replicas auto)."
    )

    @computed_field(description="tp x pp x replicas: the devices this model takes.")
    @property
    def devices(self) -> int:
        return self.tp * self.pp * self.replicas

    def layout(self) -> str:
        """``tp=2 × pp=1``, or ``3 replicas of tp=2 × pp=1``."""
        return layout_text(self.tp, self.pp, self.replicas)


class SharedDevices(BaseModel):
    """Several models on one cluster: each one's devices, the total, and whether they fit."""

    models: list[ModelDevices] = Field(description="Each model's share, the first model first.")
    first: ReplicaChoice = Field(
        description="The first model's replicas and why (lowered beside the further models)."
    )
    devices: int = Field(ge=0, description="Device slots of the cluster (GPUs or CPU slots).")

    @computed_field(description="Devices all the models take together.")
    @property
    def devices_used(self) -> int:
        return sum(m.devices for m in self.models)

    @computed_field(description="Device slots no model uses (0 when they do not fit).")
    @property
    def idle_devices(self) -> int:
        return max(0, self.devices - self.devices_used)

    @computed_field(description="Whether the models' devices add up to no more than the cluster's.")
    @property
    def fits(self) -> bool:
        return self.devices_used <= self.devices

    def layouts(self) -> str:
        """``a: 3 replicas of tp=1 × pp=1; b: tp=2 × pp=1``."""
        return "; ".join(f"{m.name}: {m.layout()}" for m in self.models)

    @computed_field(description="One line: what each model takes and whether they fit.")
    @property
    def line(self) -> str:
        if not self.fits:
            return (
                f"{self.layouts()} needs {self.devices_used} devices, the cluster has "
                f"{self.devices}: does not fit"
            )
        idle = f", {self.idle_devices} idle" if self.idle_devices else ""
        count = len(self.models)
        return (
            f"{count} {'models fit' if count != 1 else 'model fits'}: {self.devices_used} of {self.devices} "
            f"devices{idle} ({self.layouts()})"
        )

    def check(self, hint: str = FIT_HINT) -> None:
        """Raise the one-line ConfigError `up` refuses with when the models do not fit."""
        if not self.fits:
            raise ConfigError(
                f"{self.layouts()} needs {self.devices_used} devices, the cluster has "
                f"{self.devices}",
                hint=hint,
            )


def share_devices(
    first: ReplicaChoice, further: Sequence[ModelLayout], *, first_name: str
) -> SharedDevices:
    """The cluster's devices (``first.devices``) shared by the first model (its replica
    choice: as given, or auto) and the further models (their replicas as asked, else 1).

    An auto count of the first model is lowered to what the devices left beside the further
    models hold, at least 1; an asked count is kept (then the result may not fit)."""
    others = [
        ModelDevices(name=m.name, tp=m.tp, pp=m.pp, replicas=m.replicas or 1, auto=False)
        for m in further
    ]
    taken = sum(m.devices for m in others)
    if first.auto and taken:
        fit = max(1, (first.devices - taken) // (first.tp * first.pp))
        if fit < first.replicas:
            why = f"{first.why}; {fit} beside the further models' {taken} device(s)"
            first = first.model_copy(update={"replicas": fit, "why": why})
    head = ModelDevices(
        name=first_name, tp=first.tp, pp=first.pp, replicas=first.replicas, auto=first.auto
    )
    return SharedDevices(models=[head, *others], first=first, devices=first.devices)
