"""`npu-dit plan`: predicted time, memory and traffic of every parallel configuration, from the graphs the
passes would run (`costs.py`), a hardware profile stored as data (`hardware.py`, `hardware/*.json`) and a
roofline + alpha/beta cost model (`model.py`); `calibrate.py` fits a profile's efficiencies to measured runs."""
