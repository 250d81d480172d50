"""The client TLS context for the SMTP server: system CAs, plus SMTP_CA_FILE when set."""

import ssl

from .config import Config


def tls_context(cfg: Config):
    """An SSLContext for STARTTLS or implicit TLS, or None when both are off.

    SMTP_CA_FILE is added to the system's CAs rather than replacing them, so a private relay
    and a relay with a public certificate both verify.
    """
    if not (cfg.smtp_use_tls or cfg.smtp_use_starttls):
        return None
    context = ssl.create_default_context()
    if cfg.smtp_ca_file:
        context.load_verify_locations(cafile=cfg.smtp_ca_file)
    if cfg.smtp_skip_tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
