"""The generation runtime: UI settings to engine configs, pipelines on managed components, the Studio facade."""
