"""The dashboard: a page served from the static files in this folder (`/dashboard`), and the figures it
polls (`GET /cache/dashboard`)."""

from proxy.dashboard.report import Dashboard, activity_series
from proxy.dashboard.static import DashboardPage

__all__ = ["Dashboard", "DashboardPage", "activity_series"]
