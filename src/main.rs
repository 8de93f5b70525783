fn main() {
    std::process::exit(divkey::cli::run());
}
