"""The run report: which stage plays which role, the figures, the plots and the page."""
