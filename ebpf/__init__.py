"""Interference signals: eBPF probes (libbpf CO-RE, bcc fallback), cheap fallbacks, detector."""
