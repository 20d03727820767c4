"""The web console's static files (page, scripts, style sheet), served by the gateway at /console
(proxy/console.py). Vanilla JavaScript modules and CSS: no build step, nothing loaded from elsewhere."""
