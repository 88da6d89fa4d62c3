"""The web console: static pages served by the gateway at /console, plus the two small JSON routes they need."""
