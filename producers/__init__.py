"""The producer SDK for upstream services: build, validate and publish ImageRequests.

from pixelpipe.config import Settings
from pixelpipe.producers import Publisher, new_request

with Publisher(Settings.from_env()) as publisher:
    delivery = publisher.publish(new_request(prompt="a red fox", model="tiny-sd", user_id="u1")).result()
"""

from pixelpipe.producers.experiments import assign_variant
from pixelpipe.producers.publisher import Delivery, DeliveryError, Publisher
from pixelpipe.producers.requests import InvalidRequestError, new_request, validate_request

__all__ = [
    "Delivery",
    "DeliveryError",
    "InvalidRequestError",
    "Publisher",
    "assign_variant",
    "new_request",
    "validate_request",
]
