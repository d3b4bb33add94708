"""The core every stage shares: settings by concern, typed events and the codec, request validation, experiments,
the object store, the ClickHouse client, Kafka topics, ids, the clock and logs.

It imports none of the stage folders (producers, processors, sinks, analytics) and none of the tools.
"""
