"""TMAP: measured hardware profiles and a cost model that predicts, picks and explains plans.

hw = probe()                                   # or HardwareProfile.load("hw.json") / hardware_profile(...)
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
