"""Caption a video collection with FLASH on Ray (the pipeline issue builds this)."""

if __name__ == "__main__":
    print("flashcap: the captioning pipeline is not built yet; `make test` exercises the FLASH core.")
