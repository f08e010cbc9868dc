"""The node's live status page at ``/``: the node, its queue, recent jobs, deliveries with a retry
button, and overlay pictures of each result (issue 17). See ``docs/status-page.md``."""

from ian_node.app.status.routes import status_router
from ian_node.app.status.views import StatusSources

__all__ = ["StatusSources", "status_router"]
