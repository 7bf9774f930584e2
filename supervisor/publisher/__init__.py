"""The publisher process: durable outbox (outbox.py), sinks (sink.py), one delivery thread per
sink (delivery.py), and the loop that takes results from the runners (process.py)."""
