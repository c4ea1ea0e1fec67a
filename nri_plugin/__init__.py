"""nri-qos: an NRI plugin that gives every container the isolation its QoS class needs."""

__version__ = "0.1.0"
