"""The workspace database: schema, the single writer (collector) and read helpers."""
