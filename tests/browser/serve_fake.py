"""`python -m tests.browser.serve_fake [app.py flags]`: the app over FakeStudio (UI development only)."""

import sys

import app
from tests.browser.fake_studio import FakeStudio

if __name__ == "__main__":
    app.main(sys.argv[1:], studio_factory=FakeStudio)
