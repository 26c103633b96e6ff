"""swa-20m: the sliding-window baseline of drt-20m, the same code with arch="swa": 11 layers (drt-20m's
8 decoder layers plus 3 to match its 19.3M parameters with its encoder and GCA), the same 256-slot window, width and data."""

import dataclasses
import importlib.util
import pathlib

_spec = importlib.util.spec_from_file_location("drt20m", pathlib.Path(__file__).with_name("drt-20m.py"))
_drt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_drt)

MODEL = _drt.MODEL.replace(name="swa-20m", arch="swa", decoder_layers=(11,), encoder_layers=0)
RUN = dataclasses.replace(_drt.RUN, name="swa-20m", model=MODEL)
