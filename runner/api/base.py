"""Where the API lives: a constant that commands without network use need too."""

from __future__ import annotations

from typing import Final

DEFAULT_BASE_URL: Final = "https://api.apimart.ai"
