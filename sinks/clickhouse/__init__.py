"""ClickHouse sink: the versioned schema (migrations/) and the clients that apply it to a server or to chDB."""
