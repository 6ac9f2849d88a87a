"""The bottom floor: what every stage shares (safe files, untrusted input, process groups, the HTML
page skeleton), importing nothing of plop's but its errors."""
