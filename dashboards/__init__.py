"""Panel apps (``panel serve dashboards/live.py``) and the HoloViews plot functions they share."""
