"""Panel apps (``panel serve dashboards/live.py``, ``dashboards/results.py``) and the plots they share: the live
page draws plain Bokeh figures that streams append to (a tab must build fast and cost little per update); the
results page and the notebooks draw with HoloViews (``plots``), whose aggregations the live page reuses."""
