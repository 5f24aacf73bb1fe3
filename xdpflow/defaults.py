"""The defaults an operator sees in `xdpflow run --help` and the example
config, each written once. A module of constants that imports nothing, so
the CLI can show them without loading the modules that use them (numpy, the
HTTP client), and every layer can import it.
"""

IDLE_TIMEOUT = 15.0  # seconds without a packet before a flow is exported and removed
ACTIVE_TIMEOUT = 60.0  # seconds between exports of a long-lived flow's delta
SCAN_INTERVAL = 1.0  # seconds between reads of the flow tables
TEMPLATE_REFRESH = 60.0  # seconds between IPFIX template resends (UDP)
FEED_INTERVAL = 3600.0  # seconds between fetches of a blocklist feed
FEED_TIMEOUT = 10.0  # seconds without progress on one network operation of a fetch
MAX_FEED_BYTES = 16 * 1024 * 1024  # a larger feed body is refused
METRICS_LISTEN = "127.0.0.1:9437"
TOP_RULES = 20  # per-rule hit series in the metrics
