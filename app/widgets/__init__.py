"""The window's parts; each gets the session (or nothing) in __init__ and subscribes to it."""
from .banner import ErrorBanner, OfferBanner
from .capture_panel import CapturePanel
from .compute_panel import ComputePanel
from .confidence_plot import ConfidencePlot
from .exit_diagram import ExitDiagram
from .live import LiveView
from .policy_panel import PolicyPanel
from .retrain_panel import RetrainPanel
from .theme import NORMAL, PRESENTATION, Theme, contrast_ratio
from .transport import TransportBar
from .video_view import EMPTY_TEXT, VideoView

__all__ = ["EMPTY_TEXT", "CapturePanel", "ErrorBanner", "ComputePanel", "ConfidencePlot", "ExitDiagram", "LiveView",
           "OfferBanner", "PolicyPanel", "RetrainPanel", "NORMAL", "PRESENTATION", "Theme", "TransportBar", "VideoView",
           "contrast_ratio"]
