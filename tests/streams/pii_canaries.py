"""Canary corpus for the PII scrubber.

Each canary is a realistic chat snippet with exactly one seeded PII value (`secret`, unique
across the corpus). Scrubbing must turn `text` into `text` with `secret` replaced by the
placeholder of `pii_type`. Values are test/documentation ranges (fictional phone ranges,
card-network test numbers, published example IBANs, RFC 5737/3849 addresses, fake keys).

NEAR_MISSES must come out of the scrubber unchanged.
"""

from dataclasses import dataclass

from streams.pii import PiiType


@dataclass(frozen=True)
class Canary:
    pii_type: PiiType
    secret: str
    text: str

    @property
    def expected(self) -> str:
        return self.text.replace(self.secret, self.pii_type.placeholder)


def _canaries(pii_type: PiiType, pairs: list[tuple[str, str]]) -> list[Canary]:
    return [Canary(pii_type, secret, text) for secret, text in pairs]


EMAIL = _canaries(
    PiiType.EMAIL,
    [
        ("maria.gonzalez84@example.com", "Can you reply to maria.gonzalez84@example.com with the summary?"),
        ("j.smith+billing@acme-corp.co.uk", "my work email is j.smith+billing@acme-corp.co.uk, please use that"),
        ("priya_raman@example.org", "Contact: priya_raman@example.org"),
        ("ACCOUNTS.PAYABLE@EXAMPLE.NET", "Send the invoice to ACCOUNTS.PAYABLE@EXAMPLE.NET before Friday."),
        ("ole.nordmann@example.no", "Forward it to <ole.nordmann@example.no> and cc me"),
        ("t.oconnor@mail.example.ie", "(email: t.oconnor@mail.example.ie)"),
        ("kenji.tanaka@example.jp", "Rewrite this email from kenji.tanaka@example.jp so it sounds friendlier"),
        ("dev-ops.oncall@sub.example.io", "ping me at dev-ops.oncall@sub.example.io!"),
        ("lucas.silva1990@gmail.com", "Here's my gmail: lucas.silva1990@gmail.com."),
        ("françois.dupont@exemple.fr", "Unsubscribe françois.dupont@exemple.fr from the list"),
        ("zhang.wei@example.cn", "The login is zhang.wei@example.cn, what's wrong?"),
        ("noreply-7741@notifications.example.com", "Email from noreply-7741@notifications.example.com bounced."),
    ],
)

PHONE = _canaries(
    PiiType.PHONE,
    [
        ("+44 20 7946 0958", "You can call me on +44 20 7946 0958 after 6pm."),
        ("(415) 555-0132", "My cell is (415) 555-0132, text anytime"),
        ("212-555-0187", "Reach the front desk at 212-555-0187."),
        ("+49 30 12345678", "Ruf mich an: +49 30 12345678"),
        ("06 12 34 56 78", "Mon numéro: 06 12 34 56 78"),
        ("07700 900123", "UK mobile 07700 900123 is mine"),
        ("+1 (646) 555-0199", "Call +1 (646) 555-0199 for support"),
        ("+33 1 42 68 53 00", "tel: +33 1 42 68 53 00"),
        ("+91 98765 43210", "WhatsApp me at +91 98765 43210"),
        ("6175550143", "call me at 6175550143 tonight"),
        ("0161 496 0000", "Our office line is 0161 496 0000."),
        ("+61 2 9374 4000", "Phone number: +61 2 9374 4000"),
        ("1-800-555-0199", "dial 1-800-555-0199 to cancel"),
        ("+81-3-1234-5678", "+81-3-1234-5678 is the Tokyo office"),
        ("089/12345678", "Büro: 089/12345678"),
        ("+4915112345678", "My number is +4915112345678"),
        ("0049 30 1234567", "Ruf mich unter 0049 30 1234567 an"),
        ("555-0134", "ph. 555-0134 (ask for the front desk)"),
        ("2025550148", "if the app fails, call 2025550148 or email support"),
    ],
)

CARD = _canaries(
    PiiType.CARD,
    [
        ("4111 1111 1111 1111", "My card is 4111 1111 1111 1111, exp 12/27"),
        ("5555-5555-5555-4444", "charge 5555-5555-5555-4444 please"),
        ("3782 822463 10005", "Amex 3782 822463 10005 was declined"),
        ("6011111111111117", "number 6011111111111117 didn't work"),
        ("4012888888881881", "Card: 4012888888881881 CVV 123"),
        ("5105 1051 0510 5100", "Use 5105 1051 0510 5100 for the refund"),
        ("3530 1113 3330 0000", "JCB 3530 1113 3330 0000"),
        ("3056 9309 0259 04", "Diners 3056 9309 0259 04"),
        ("2223 0031 2200 3222", "Mastercard 2223 0031 2200 3222 expires soon"),
        ("4000 0566 5566 5556", "the visa 4000 0566 5566 5556 got charged twice"),
        ("6200 0000 0000 0005", "UnionPay 6200 0000 0000 0005"),
        ("371449635398431", "full number 371449635398431, can you check it?"),
        ("4242424242424242", "4242424242424242 is the card I used"),
    ],
)

IBAN = _canaries(
    PiiType.IBAN,
    [
        ("DE89 3704 0044 0532 0130 00", "Please wire it to DE89 3704 0044 0532 0130 00, thanks"),
        ("GB82WEST12345698765432", "IBAN: GB82WEST12345698765432"),
        ("FR14 2004 1010 0505 0001 3M02 606", "My French account FR14 2004 1010 0505 0001 3M02 606"),
        ("NL91ABNA0417164300", "NL91ABNA0417164300 is my Dutch account"),
        ("es91 2100 0418 4502 0005 1332", "transfer to es91 2100 0418 4502 0005 1332 please"),
        ("IT60 X054 2811 1010 0000 0123 456", "Conto: IT60 X054 2811 1010 0000 0123 456"),
        ("BE68 5390 0754 7034", "Belgian IBAN BE68 5390 0754 7034."),
        ("CH93 0076 2011 6238 5295 7", "CH93 0076 2011 6238 5295 7 for the deposit"),
        ("AT61 1904 3002 3457 3201", "pay rent to AT61 1904 3002 3457 3201 monthly"),
        ("PL61 1090 1014 0000 0712 1981 2874", "numer konta PL61 1090 1014 0000 0712 1981 2874"),
        ("NO93 8601 1117 947", "Norwegian one: NO93 8601 1117 947"),
        ("SE45 5000 0000 0583 9825 7466", "refund SE45 5000 0000 0583 9825 7466 asap"),
        ("IE29 AIBK 9311 5212 3456 78", "my Irish IBAN is IE29 AIBK 9311 5212 3456 78"),
    ],
)

IP = _canaries(
    PiiType.IP,
    [
        ("203.0.113.42", "My server is at 203.0.113.42 and it's down"),
        ("198.51.100.7", "ssh root@198.51.100.7 times out"),
        ("192.168.1.105", "Whitelist 192.168.1.105 in the firewall"),
        ("10.20.30.40", "curl http://10.20.30.40:8080/health fails"),
        ("2001:db8:85a3::8a2e:370:7334", "IPv6 2001:db8:85a3::8a2e:370:7334 is my host"),
        ("fe80::1ff:fe23:4567:890a", "link-local fe80::1ff:fe23:4567:890a%eth0 on the laptop"),
        ("81.2.69.142", "my home IP is 81.2.69.142."),
        ("172.16.254.1", "blocked 172.16.254.1 yesterday"),
        ("2001:db8::ff00:42:8329", "connect to [2001:db8::ff00:42:8329]:443"),
        ("100.64.12.7", "client ip=100.64.12.7 in the access log"),
        ("::ffff:192.0.2.128", "::ffff:192.0.2.128 is the mapped address"),
        ("2001:0db8:0000:0000:0000:ff00:0042:8329", "The logs show 2001:0db8:0000:0000:0000:ff00:0042:8329"),
    ],
)

URL_SECRET = _canaries(
    PiiType.URL_SECRET,
    [
        (
            "postgres://admin:S3cretPass@db.internal.example.com:5432/prod",
            "Connect with postgres://admin:S3cretPass@db.internal.example.com:5432/prod",
        ),
        (
            "https://app.example.com/reset?token=9f8e7d6c5b4a39281706f5e4d3c2b1a0",
            "Reset link: https://app.example.com/reset?token=9f8e7d6c5b4a39281706f5e4d3c2b1a0",
        ),
        (
            "https://api.example.com/v1/data?api_key=AbC123xYz789&format=json",
            "https://api.example.com/v1/data?api_key=AbC123xYz789&format=json is returning 500",
        ),
        (
            "https://oauth2:tok3nValue9@gitlab.example.com/group/repo.git",
            "clone from https://oauth2:tok3nValue9@gitlab.example.com/group/repo.git please",
        ),
        (
            "https://bucket.s3.amazonaws.com/report.pdf?X-Amz-Expires=3600&X-Amz-Signature=abcdef0123456789",
            "the S3 link https://bucket.s3.amazonaws.com/report.pdf?X-Amz-Expires=3600&X-Amz-Signature=abcdef0123456789 expired",
        ),
        ("redis://:p4ssw0rd@cache.example.com:6379/0", "REDIS_URL is redis://:p4ssw0rd@cache.example.com:6379/0"),
        ("ftp://jdoe:doe123@files.example.org/pub", "grab it from ftp://jdoe:doe123@files.example.org/pub."),
        (
            "https://example.com/callback#access_token=ya29.a0AfH6SMBx&token_type=Bearer",
            "it redirected to https://example.com/callback#access_token=ya29.a0AfH6SMBx&token_type=Bearer",
        ),
        ("www.example.com/login?password=hunter2", "I typed www.example.com/login?password=hunter2 by mistake"),
        ("Www.example.com/account?session=8f7e6d5c4b3a", "Www.example.com/account?session=8f7e6d5c4b3a shows my cart"),
        (
            "wss://stream.example.com/socket?session=7c9e6679-7425-40de-944b-e07fc1f90ae7",
            "websocket wss://stream.example.com/socket?session=7c9e6679-7425-40de-944b-e07fc1f90ae7 drops",
        ),
        (
            "https://hooks.example.com/notify?sig=5d41402abc4b2a76b9719d911017c592&ts=1700000000",
            "webhook https://hooks.example.com/notify?sig=5d41402abc4b2a76b9719d911017c592&ts=1700000000",
        ),
        (
            "https://drive.example.com/file/d/abc?key=Zx81LmQ2",
            "Link (https://drive.example.com/file/d/abc?key=Zx81LmQ2) expired",
        ),
        (
            "mongodb+srv://appuser:Pa55w0rd!@cluster0.example.mongodb.net/test",
            "uri = mongodb+srv://appuser:Pa55w0rd!@cluster0.example.mongodb.net/test",
        ),
    ],
)

SECRET = _canaries(
    PiiType.SECRET,
    [
        ("sk-proj-4fGh7Jk2Lm9Np3Qr8St1Uv6Wx0Yz5Ab", "here's my key sk-proj-4fGh7Jk2Lm9Np3Qr8St1Uv6Wx0Yz5Ab can you test it"),
        ("ghp_aB3dE5fG7hI9jK1lM3nO5pQ7rS9tU1vW3xY5", "export GITHUB_TOKEN=ghp_aB3dE5fG7hI9jK1lM3nO5pQ7rS9tU1vW3xY5"),
        ("AKIAIOSFODNN7EXAMPLE", "AWS key id AKIAIOSFODNN7EXAMPLE leaked?"),
        (
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        ),
        (
            "xoxb-2345678901-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx",
            "Slack bot token xoxb-2345678901-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx stopped working",
        ),
        (
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiI0MiIsImlhdCI6MTUxNjIzOTAyMn0"
            ".dQw4w9WgXcQ_s1gnatur3PartXyZ",
            "decode this JWT: eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiI0MiIsImlhdCI6MTUxNjIzOTAyMn0"
            ".dQw4w9WgXcQ_s1gnatur3PartXyZ",
        ),
        ("8f14e45fceea167a5a36dedd4bea2543abc", "Authorization: Bearer 8f14e45fceea167a5a36dedd4bea2543abc"),
        ("Tr0ub4dor&3", "DB_PASSWORD=Tr0ub4dor&3"),
        ("d8e8fca2dc0f896fd7cb4cb0031ba249", '{"client_secret": "d8e8fca2dc0f896fd7cb4cb0031ba249"}'),
        ("sk_live_51Hx9ZqLmN0pQrStUvWxYz12", "stripe says sk_live_51Hx9ZqLmN0pQrStUvWxYz12 is invalid"),
        ("AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY", "Google key AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY"),
        (
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7bqXk2\nq9Zr4TtYw==\n-----END RSA PRIVATE KEY-----",
            "why does ssh reject this?\n-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7bqXk2\nq9Zr4TtYw==\n"
            "-----END RSA PRIVATE KEY-----\nthanks",
        ),
        ("Zk93hQ0pLr7XvB2mNc4T", "api_key: 'Zk93hQ0pLr7XvB2mNc4T'"),
        ("sk-ant-api03-Xy7zAbCdEf12GhIjKl34MnOpQr56", "my anthropic key sk-ant-api03-Xy7zAbCdEf12GhIjKl34MnOpQr56"),
    ],
)

PERSON = _canaries(
    PiiType.PERSON,
    [
        ("Margarethe Vollmer", "Hi, my name is Margarethe Vollmer and I need help with my tax form."),
        ("Oluwaseun", "I'm Oluwaseun, a nurse from Lagos."),
        ("Castellanos", "Dear Mr. Castellanos,\nthank you for the quick reply."),
        ("Tomasz Wiśniewski", "See you on Monday.\n\nBest regards,\nTomasz Wiśniewski"),
        ("Anika Brandt", "Please write a reference letter for Dr. Anika Brandt."),
        ("siobhan mcallister", "my name is siobhan mcallister, how do I change it on the account?"),
        ("Beatriz", "Hello Beatriz,\ncan you review the draft?"),
        ("Rahul Venkataraman", "This is Rahul Venkataraman from the billing team."),
        ("Ingrid", "That fixed it. Thanks,\nIngrid"),
        ("Nakamura-Whitfield", "Ms. Nakamura-Whitfield will join the call"),
        ("Jean-Baptiste Okonkwo", "From: Jean-Baptiste Okonkwo\nSubject: Q3 numbers"),
        ("Thaddeus", "Call me Thaddeus, everyone does."),
        ("Aoife O'Sullivan", "Let me know.\nSincerely, Aoife O'Sullivan"),
        ("Leilani Kahananui", "I am Leilani Kahananui and I can't log in."),
        ("Ngozi Adeyemi", "Prof. Ngozi Adeyemi asked me to summarize this paper"),
        ("Dmitri", "Hey Dmitri! Quick question about SQL joins."),
        ("Karim Haddad", "Thanks!\n\n-- \nKarim Haddad"),
        ("Aditi Rao", "Will send it tomorrow.\n— Aditi Rao"),
    ],
)

ADDRESS = _canaries(
    PiiType.ADDRESS,
    [
        ("58 Larkspur Avenue", "My landlord at 58 Larkspur Avenue won't return the deposit."),
        ("9 Alder Close, Reading RG1 7QT", "Post the forms to 9 Alder Close, Reading RG1 7QT please"),
        ("4410 Cedar Springs Rd, Dallas, TX 75219", "new address: 4410 Cedar Springs Rd, Dallas, TX 75219"),
        ("Lindenstraße 47, 50674 Köln", "Ich wohne in der Lindenstraße 47, 50674 Köln."),
        ("8 avenue Victor Hugo, 69002 Lyon", "Livraison au 8 avenue Victor Hugo, 69002 Lyon"),
        ("PO Box 3307", "Mail the cheque to PO Box 3307 instead."),
        ("126 Marlowe Street", "is 126 Marlowe Street in a flood zone?"),
        ("31 Birchwood Drive", "We bought 31 Birchwood Drive last spring and the roof leaks."),
        ("Prinsengracht 263", "Meet me at Prinsengracht 263 at noon"),
        ("705 Granville St, Vancouver, BC V6Z 1K9", "Store pickup at 705 Granville St, Vancouver, BC V6Z 1K9."),
        ("Calle de Alcalá 42", "El piso está en Calle de Alcalá 42, tercero."),
    ],
)

SSN = _canaries(
    PiiType.SSN,
    [
        ("341-22-7810", "My SSN is 341-22-7810 and the portal rejects it"),
        ("258-61-0043", "Fix this letter: Re: account of John, SSN 258-61-0043."),
        ("189 40 2261", "social security number 189 40 2261"),
        ("620-08-5517", "The IRS letter mentions 620-08-5517, is that mine?"),
        ("433-90-1182", "ssn: 433-90-1182"),
        ("071-35-6624", "Employee record: 071-35-6624, start date Monday"),
        ("529114478", "SSN 529114478 (no dashes, as the form asks)"),
        ("744-27-3090", "my social is 744-27-3090, don't share it"),
        ("316-52-8801", "Which box gets 316-52-8801 on the W-4?"),
        ("205-71-4436", "Her Social Security No. 205-71-4436 was stolen"),
    ],
)

DATE_OF_BIRTH = _canaries(
    PiiType.DATE_OF_BIRTH,
    [
        ("17 September 1991", "I was born on 17 September 1991 in Porto."),
        ("1962-05-30", "DOB: 1962-05-30"),
        ("08/14/2003", "Date of birth 08/14/2003 on the enrolment form"),
        ("March 2, 1977", "My date of birth is March 2, 1977."),
        ("21.01.1989", "geboren am... sorry, born 21.01.1989"),
        ("3rd of May 1995", "my birthday is the 3rd of May 1995"),
        ("29 Feb 1992", "D.O.B. 29 Feb 1992, is that a leap day?"),
        ("1948/11/07", "Birthdate: 1948/11/07"),
        ("December 24th, 1985", "He was born on December 24th, 1985, on Christmas Eve."),
        ("10-30-1970", "dob 10-30-1970, male"),
    ],
)

PASSPORT = _canaries(
    PiiType.PASSPORT,
    [
        ("L8829014", "passport number L8829014, expiring 2031"),
        ("561209734", "My passport no. 561209734 was flagged at the border"),
        ("C4RJ77K31", "Reisepass / passport: C4RJ77K31"),
        ("N6102293", "Fill the ESTA with passport # N6102293"),
        ("18FR66210", "her passport number is 18FR66210"),
        ("PA3301927", "Passport No: PA3301927"),
        ("330918472", "the passport was 330918472 before I renewed it"),
        ("T9047718", "Use passport T9047718 for the booking"),
        ("GB7720145", "passport id: GB7720145"),
        ("RK551903", "my new passport number RK551903 isn't in the airline app"),
    ],
)

HANDLE = _canaries(
    PiiType.HANDLE,
    [
        ("@mika_draws", "follow me on insta @mika_draws for the sketches"),
        ("@devon.runs", "My Instagram is @devon.runs"),
        ("@quietquokka42", "DM me on twitter @quietquokka42"),
        ("ravi.k.music", "my tiktok is ravi.k.music"),
        ("@hollowpine_games", "Our studio's Twitter @hollowpine_games posts the patch notes"),
        ("sk8r_lena", "add me on snapchat: sk8r_lena"),
        ("u/ferngully_77", "that's my reddit, u/ferngully_77"),
        ("@mariaperez.arq", "tag @mariaperez.arq on Instagram in the post"),
        ("nightowl#2290", "my discord username is nightowl#2290"),
        ("@bea_codes", "You can find me on X as @bea_codes"),
    ],
)

CANARIES: list[Canary] = (
    EMAIL + PHONE + CARD + IBAN + IP + URL_SECRET + SECRET + PERSON + ADDRESS + SSN + DATE_OF_BIRTH + PASSPORT + HANDLE
)

NEAR_MISSES: list[str] = [
    # numbers that are not phones or cards
    "In 2023 we shipped 1500 units.",
    "The total is $1,299.99 including tax.",
    "Upgrade to version 3.11.7 before Friday.",
    "pip install torch==2.13.0",
    "Order #A-20231115-0042 is delayed.",
    "My order number is 123456789012.",
    "Ticket 4111111111111112 was closed.",
    "Reference 1234 5678 9012 3456 is not a card.",
    "Tracking 9400 1000 0000 0000 0000 00 shows delivered.",
    "The meeting is on 2024-03-15 at 10:30.",
    "Dates: 01/02/2023 10:30 and 15.03.2024.",
    "It weighs 2.5 kg and costs 19.99 EUR.",
    "Run it 3 times with 10 000 iterations.",
    "Population was 8 336 817 in 2020.",
    "Temperatures ranged from -5 to +25 degrees.",
    "+1 for this idea",
    "The call starts at UTC+05:30.",
    "ISBN 978-3-16-148410-0",
    "Windows version 10.0.19041.1 crashed.",
    "Chrome 120.0.6099.109 is installed.",
    "The ratio is 16:9 and the resolution 1920x1080.",
    "iPhone 15 Pro costs 999 dollars.",
    "Use port 8080 and a timeout of 30s.",
    "lat 52.5200, lon 13.4050",
    "my phone: 3 missed calls today",
    "Account DE12 3456 7890 1234 5678 90 fails the checksum.",
    "Page 12 of 340, see section 4.2.1.",
    # ordinary capitalized words and greetings
    "Apple released a new phone. Monday is busy. Python is great.",
    "Will you check it? May I ask? Grace period ends Monday. Hope this helps.",
    "Hi team, the build is green.",
    "Hello World!",
    "I'm Sorry, I'm not sure this works.",
    "Dear Sir or Madam,",
    "Thanks, that fixed it!",
    "Best practices for Python logging",
    "My name is not important here.",
    "This is Python code, not Java.",
    "Call me tomorrow.",
    "Call it 1000 times, call us at 9am.",
    "Hi Claude, can you explain decorators?",
    "I'm Learning Rust and I'm Stuck on lifetimes.",
    "Summary below.\n-- Note that the API changed in v2.",
    # code snippets and technical text
    "for i in range(10): print(i)",
    "evens = arr[::2]; odds = arr[1::2]",
    "std::vector<int> v; std::map<std::string, int> m;",
    "response = client.chat(max_tokens=512, temperature=0.7)",
    "password = getpass.getpass()",
    "tokenizer = AutoTokenizer.from_pretrained('gpt2')",
    "api_key = os.environ['OPENAI_API_KEY']",
    "token: string; secret_name: prod-db",
    "SELECT * FROM users WHERE id = 42;",
    "git clone https://github.com/org/repo.git",
    "See https://docs.python.org/3/library/re.html?highlight=sub#re.sub",
    "sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "commit a94a8fe5ccb19ba61c4c0873d391e987982fbbd3",
    "uvicorn app:main --host 127.0.0.1 --port 8000",
    "Listen on 0.0.0.0:80",
    "The job ran at 12:30:45 and again at 23:59:59.",
    '{"max_tokens": 1024, "temperature": 0.7}',
    "Bearer authentication uses an opaque token.",
    "sk-learn is not a package name, scikit-learn is.",
    "Use @app.route('/users') and x @ y for matmul.",
]
