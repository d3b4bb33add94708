"""One realistic record of every schema, with every optional field set, for round-trip and fixture tests.

tests/fixtures/v1, v2, ... hold these records as each version's schemas wrote them: never change the value of a
field a frozen version has here (fields added later, such as ImageResult's steps or
ImageRequest's reference_image_uris, are not in the v1 fixtures).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

T0 = dt.datetime(2026, 11, 25, 12, 30, 15, 123000, tzinfo=dt.UTC)


def sample_records() -> dict[str, dict[str, Any]]:
    common = {"request_id": "req-0001", "schema_version": 1, "event_time": T0}
    return {
        "ImageRequest": common
        | {
            "event_id": "2f1c5a34-7f6e-4c1b-9d0e-1a2b3c4d5e6f",
            "kind": "EDIT",
            "user_id": "user-42",
            "prompt": "a red fox in fresh snow, photograph — ünïcödé ✓",
            "negative_prompt": "blurry",
            "n": 3,
            "width": 512,
            "height": 768,
            "steps": 30,
            "guidance": 7.5,
            "seed": 2**40 + 7,
            "model": "sd-1.5",
            "source_image_uri": "s3://pixelpipe/inputs/fox.png",
            "reference_image_uris": ["s3://pixelpipe/inputs/hat.png", "s3://pixelpipe/inputs/scarf.png"],
            "mask_uri": "s3://pixelpipe/inputs/fox-mask.png",
            "strength": 0.75,
            "experiments": {"steps-test": "fast", "model-test": "control"},
            "priority": "INTERACTIVE",
            "deadline": T0 + dt.timedelta(minutes=5),
            "created_at": T0 - dt.timedelta(milliseconds=250),
            "reply_topic": "svc-a.results",
            "experiment_revisions": {"steps-test": 2},
        },
        "ImageResult": common
        | {
            "event_id": "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",
            "status": "REJECTED",
            "kind": "GENERATE",
            "user_id": "user-42",
            "images": [
                {
                    "uri": "s3://pixelpipe/images/2026/11/25/req-0001/0.png",
                    "sha256": "ab" * 32,
                    "width": 512,
                    "height": 768,
                    "format": "PNG",
                    "bytes": 123456,
                },
            ],
            "moderation_stage": "OUTPUT_IMAGE",
            "moderation_scores": [
                {"category": "sexual", "score": 0.875},
                {"category": "violence", "score": 0.125},
            ],
            "error_code": "MODERATION_REJECTED",
            "error_message": "output image 0 rejected: sexual",
            "model": "sd-1.5",
            "experiments": {"steps-test": "fast"},
            "variant": "steps-test:fast",
            "request_created_at": T0 - dt.timedelta(seconds=3),
            "timings_ms": {"moderation": 12.5, "generate": 1834.25},
            "steps": 30,
            "guidance": 7.5,
            "scheduler": "ddim",
            "width": 512,
            "height": 768,
            "seed": 2**40 + 7,
            "strength": 0.75,
            "batch_size": 4,
            "pool": "sd",
            "experiment_revisions": {"steps-test": 2},
        },
        "StageMetric": common
        | {
            "event_id": "0d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6",
            "stage": "GENERATE",
            "outcome": "OK",
            "queue_ms": 41.5,
            "compute_ms": 1834.25,
            "batch_size": 4,
            "device": "cuda:0",
            "device_seconds": 0.4585625,
            "cost_usd": 0.000318,
            "worker_id": "worker-gpu-1",
            "user_id": "user-42",
            "model": "sd-1.5",
            "experiments": {"steps-test": "fast"},
            "variant": "steps-test:fast",
            "device_seconds_saved": None,  # set when the outcome is CANCELLED
            "pool": "sd",
            "experiment_revisions": {"steps-test": 2},
        },
        "DeadLetter": common
        | {
            "event_id": "5e6f7a8b-9c0d-4e1f-a2b3-c4d5e6f7a8b9",
            "original_key": b"req-0001",
            "original_value": b"\xc3\x01garbage\x00\xff",
            "topic": "pixelpipe.requests",
            "partition": 3,
            "offset": 123456789,
            "error_reason": "single-object encoding with fingerprint 6761726261676500 matches no shipped schema",
            "stage": "moderation",
        },
        "Cancellation": common
        | {
            "event_id": "7c1d2e3f-4a5b-4c6d-8e9f-a0b1c2d3e4f5",
            "reason": "the caller closed the connection",
            "requested_by": "gateway:gw-1",
        },
        "ExperimentDefinition": {
            "event_id": "5a6b7c8d-9e0f-4a1b-8c2d-3e4f5a6b7c8d",
            "schema_version": 1,
            "event_time": common["event_time"],
            "key": "sd-lcm-rollout",
            "revision": 3,
            "state": "RUNNING",
            "control": "control",
            "variants": [
                {"name": "control", "weight": 75.0, "model": None, "steps": None, "guidance": None, "scheduler": None},
                {
                    "name": "treatment",
                    "weight": 25.0,
                    "model": "sd-lcm",
                    "steps": 4,
                    "guidance": 1.5,
                    "scheduler": "lcm",
                },
            ],
            "start": common["event_time"],
            "end": None,
            "description": "LCM at 4 steps against the default",
            "applied_by": "rollout-controller",
        },
        "RolloutDecision": {
            "event_id": "6b7c8d9e-0f1a-4b2c-9d3e-4f5a6b7c8d9e",
            "schema_version": 1,
            "event_time": common["event_time"],
            "rollout": "sd-lcm-rollout",
            "sequence": 1,
            "action": "START",
            "step": 0,
            "percent_before": 0.0,
            "percent_after": 5.0,
            "revision_before": 0,
            "revision_after": 1,
            "reason": "started by cli:ana",
            "figures": {"users_control": 0.0},
            "decided_by": "cli:ana",
            "plan": {
                "control_model": "sd-1.5",
                "treatment": {"name": "treatment", "model": "sd-lcm", "steps": 4, "guidance": None, "scheduler": "lcm"},
                "steps": [5.0, 25.0, 50.0, 100.0],
                "min_users": 500,
                "alpha": 0.05,
                "guardrails": [{"metric": "failure_rate", "margin": 0.01, "relative": False}],
            },
        },
        "ModelPool": {
            "event_id": "0e1f2a3b-4c5d-4e6f-8a9b-c0d1e2f3a4b5",
            "schema_version": 1,
            "event_time": common["event_time"],
            "name": "sd",
            "models": ["sd-1.5", "sd-1.5-lcm"],
            "partitions": 8,
            "min_replicas": 1,
            "max_replicas": 8,
            "lag_threshold": 16,
            "applied_by": "cli",
        },
    }
