"""TMAP: hardware profiles and a cost model that predicts, picks and explains plans (`auto` included).

Measuring a profile is a tool above the engine (`tilemem.tools.probe`, `tilemem doctor --probe`); TMAP
only reads profiles and never imports the engine or the runtime.

hw = HardwareProfile.load("hw.json")           # or a reference profile by name / hardware_profile(...)
pred = predict(plan, hw, ServingWorkload(profile, batch=1))
table = recommend(ckpt_or_topology, profile, hw, budget="cpu=4GiB")
"""

from tilemem.tmap.cost import Prediction, RuntimeSettings, ServingWorkload, StepTime, predict
from tilemem.tmap.hardware import (
    DiskFigure,
    FetchFigure,
    HardwareError,
    HardwareProfile,
    KernelFigure,
    hardware_profile,
    reference_profiles,
)

__all__ = [
    "DiskFigure",
    "FetchFigure",
    "HardwareError",
    "HardwareProfile",
    "KernelFigure",
    "Prediction",
    "RuntimeSettings",
    "ServingWorkload",
    "StepTime",
    "hardware_profile",
    "predict",
    "reference_profiles",
]
