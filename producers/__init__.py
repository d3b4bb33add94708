"""The producer SDK for upstream services: build, validate and publish ImageRequests, or publish one and await its
result with a client (``PixelpipeClient``, ``AsyncPixelpipeClient``: ``client.py``).

from pixelpipe.core.settings import Settings
from pixelpipe.producers import Publisher, new_request

with Publisher(Settings.from_env()) as publisher:
    request = new_request(prompt="a red fox", model="tiny-sd", user_id="u1")
    delivery = publisher.publish(request).result()
    print(publisher.cancel(request.request_id))  # CANCELLED, already finished (with its status), or no result yet
"""

from pixelpipe.core.experiments import assign_variant
from pixelpipe.core.validation import InvalidRequestError, validate_request
from pixelpipe.producers.client import AsyncPixelpipeClient, PixelpipeClient, ResultTimeoutError
from pixelpipe.producers.publisher import Delivery, DeliveryError, PendingDelivery, Publisher
from pixelpipe.producers.replies import Preview
from pixelpipe.producers.requests import new_request
from pixelpipe.producers.results import CancelOutcome

__all__ = [
    "AsyncPixelpipeClient",
    "CancelOutcome",
    "Delivery",
    "DeliveryError",
    "InvalidRequestError",
    "PendingDelivery",
    "PixelpipeClient",
    "Preview",
    "Publisher",
    "ResultTimeoutError",
    "assign_variant",
    "new_request",
    "validate_request",
]
