import pytest


@pytest.fixture(scope="session")
def play_data_dir(tmp_path_factory):
    """A folder of generated play datasets shared by the smoke runs of the scripts: the first run that asks for a
    dataset generates it there, later ones load it (``cached_play_dataset`` checks the file against the request)."""
    return tmp_path_factory.mktemp("play-data")
